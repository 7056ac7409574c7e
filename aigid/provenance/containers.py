"""Walk an image file's container and hand back its metadata segments, without decoding pixels.

One pass over the structure the format defines: JPEG marker segments up to the first scan, PNG
chunks up to ``IEND``, RIFF (WebP) chunks, ISOBMFF (AVIF, HEIF, JPEG XL container) top-level
boxes. Only lengths are read on the way; image data is skipped by its length, never copied. Every
length is checked against the bytes present: a segment that runs past the end of the file, or a
structure that breaks the format's rules, raises ``EvidenceError`` (the caller turns it into
``evidence_error``). Payloads are ``memoryview`` slices, so a 100 MB chunk costs nothing until a
reader decides (under its own cap) to look at it.

Where each format keeps what (references in comments at each walker):
JPEG  APP1 ``Exif\\0\\0`` (EXIF), APP1 ``http://ns.adobe.com/xap/1.0/\\0`` (XMP) and its extension,
      APP11 ``JP`` (JUMBF, ISO 19566-5 / C2PA 2.x "Embedding manifests into JPEG")
PNG   ``tEXt`` / ``zTXt`` / ``iTXt`` (text, XMP under ``XML:com.adobe.xmp``), ``eXIf``, ``caBX``
WebP  ``EXIF``, ``XMP ``, ``C2PA`` chunks
BMFF  ``uuid`` box D8FEC3D6-1B0E-483C-9297-5828877EC481 (C2PA), JPEG XL ``jumb`` / ``xml `` /
      ``Exif`` boxes
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from aigid.data.jpeg_markers import JpegStructureError, segments

__all__ = ["EvidenceError", "Segment", "sniff_format", "walk", "MIME"]


class EvidenceError(ValueError):
    """Metadata that is truncated, oversized or malformed (the reason is the message)."""


class Segment(NamedTuple):
    kind: str  # "exif" | "xmp" | "jumbf" | "text" | "ztext" | "itext"
    where: str  # the container and the place, e.g. "jpeg:app11", "png:caBX"
    data: memoryview
    first: bool = True  # False for a JPEG APP11 continuation packet of an earlier JUMBF box


MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "avif": "image/avif",
        "heif": "image/heic", "jxl": "image/jxl"}

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JXL_SIG = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_C2PA_UUID = bytes.fromhex("d8fec3d61b0e483c92975828877ec481")  # C2PA spec, "Embedding in BMFF"
_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXT_JPEG = b"http://ns.adobe.com/xmp/extension/\x00"
_PNG_KINDS = {b"tEXt": "text", b"zTXt": "ztext", b"iTXt": "itext", b"eXIf": "exif",
              b"caBX": "jumbf"}
_WEBP_KINDS = {b"EXIF": "exif", b"XMP ": "xmp", b"C2PA": "jumbf"}
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"hevc", b"hevx"}


def sniff_format(data: bytes) -> Optional[str]:
    """``jpeg``, ``png``, ``webp``, ``avif``, ``heif``, ``jxl`` or None (nothing to walk)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIG:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:12] == _JXL_SIG:
        return "jxl"
    if data[4:8] == b"ftyp":
        brand = bytes(data[8:12])
        return "avif" if brand in (b"avif", b"avis") else "heif" if brand in _HEIF_BRANDS else None
    return None


def walk(data: bytes) -> tuple[Optional[str], list[Segment]]:
    """(format, metadata segments in file order); ``EvidenceError`` on a broken structure."""
    fmt = sniff_format(data)
    view = memoryview(data)
    walker = {"jpeg": _jpeg, "png": _png, "webp": _webp, "avif": _bmff, "heif": _bmff,
              "jxl": _bmff}.get(fmt)
    return fmt, (list(walker(view)) if walker is not None else [])


def _jpeg(data: memoryview) -> Iterator[Segment]:
    # metadata APPn segments precede the first SOS (0xDA), where the walk ends
    try:
        for marker, i, payload in segments(data):
            if marker == 0xE1:
                if payload[:6] == b"Exif\x00\x00":
                    yield Segment("exif", "jpeg:app1", payload[6:])
                elif payload[:len(_XMP_JPEG)] == _XMP_JPEG:
                    yield Segment("xmp", "jpeg:app1", payload[len(_XMP_JPEG):])
                elif payload[:len(_XMP_EXT_JPEG)] == _XMP_EXT_JPEG:  # + GUID(32) + size(4) + offset(4)
                    yield Segment("xmp", "jpeg:app1-extended", payload[len(_XMP_EXT_JPEG) + 40:])
            elif marker == 0xEB and payload[:2] == b"JP":
                # ISO 19566-5 (JPEG 360 / JUMBF in JPEG): CI "JP", En (2), Z (4), then the box.
                if len(payload) < 16:
                    raise EvidenceError(f"JPEG: APP11 JUMBF segment at byte {i} is too short")
                seq = int.from_bytes(payload[4:8], "big")
                yield Segment("jumbf", "jpeg:app11", payload[8:], first=seq <= 1)
    except JpegStructureError as err:
        raise EvidenceError(str(err)) from None


def _png(data: memoryview) -> Iterator[Segment]:
    # PNG spec 5.3: length (4, big-endian), type (4), data, CRC (4); IEND ends the stream.
    n, i = len(data), 8
    while True:
        if i + 8 > n:
            raise EvidenceError("PNG: the file ends before its IEND chunk")
        length = int.from_bytes(data[i:i + 4], "big")
        ctype = bytes(data[i + 4:i + 8])
        if length > 0x7FFFFFFF:
            raise EvidenceError(f"PNG: chunk at byte {i} declares {length} bytes (max 2^31-1)")
        if not ctype.isalpha():
            raise EvidenceError(f"PNG: invalid chunk type {ctype!r} at byte {i}")
        end = i + 12 + length
        if end > n:
            raise EvidenceError(f"PNG: chunk {ctype.decode('ascii')} at byte {i} ({length} bytes) "
                                "runs past the end of the file")
        if ctype == b"IEND":
            return
        kind = _PNG_KINDS.get(ctype)
        if kind is not None:
            yield Segment(kind, "png:" + ctype.decode("ascii"), data[i + 8:i + 8 + length])
        i = end


def _webp(data: memoryview) -> Iterator[Segment]:
    # RIFF: FourCC (4), size (4, little-endian), payload, a pad byte to an even size.
    n, i = len(data), 12
    while i < n:
        if i + 8 > n:
            raise EvidenceError("WebP: the file ends inside a chunk header")
        fourcc = bytes(data[i:i + 4])
        length = int.from_bytes(data[i + 4:i + 8], "little")
        if i + 8 + length > n:
            raise EvidenceError(f"WebP: chunk {fourcc!r} at byte {i} ({length} bytes) runs past "
                                "the end of the file")
        kind = _WEBP_KINDS.get(fourcc)
        if kind is not None:
            where = "webp:" + fourcc.decode("ascii").strip()
            yield Segment(kind, where, data[i + 8:i + 8 + length])
        i += 8 + length + (length & 1)


def _bmff(data: memoryview) -> Iterator[Segment]:
    # ISO/IEC 14496-12 4.2: size (4) type (4) [largesize (8) when size == 1; to the end when 0].
    n, i = len(data), 0
    while i < n:
        if i + 8 > n:
            raise EvidenceError("BMFF: the file ends inside a box header")
        size = int.from_bytes(data[i:i + 4], "big")
        btype = bytes(data[i + 4:i + 8])
        head = 8
        if size == 1:
            if i + 16 > n:
                raise EvidenceError("BMFF: the file ends inside a box header")
            size, head = int.from_bytes(data[i + 8:i + 16], "big"), 16
        elif size == 0:
            size = n - i
        if size < head:
            raise EvidenceError(f"BMFF: box {btype!r} at byte {i} has size {size}")
        if i + size > n:
            raise EvidenceError(f"BMFF: box {btype!r} at byte {i} ({size} bytes) runs past the end "
                                "of the file")
        body = data[i + head:i + size]
        if btype == b"uuid" and bytes(body[:16]) == _C2PA_UUID:
            yield Segment("jumbf", "bmff:uuid-c2pa", _c2pa_uuid_payload(body[16:], i))
        elif btype == b"jumb":  # JPEG XL container: the box itself is the JUMBF superbox
            yield Segment("jumbf", "jxl:jumb", data[i:i + size])
        elif btype == b"xml ":
            yield Segment("xmp", "jxl:xml", body)
        elif btype == b"Exif" and len(body) >= 4:  # a 4-byte offset to the TIFF header
            yield Segment("exif", "jxl:Exif", body[4 + int.from_bytes(body[:4], "big"):])
        i += size


def _c2pa_uuid_payload(body: memoryview, at: int) -> memoryview:
    """The JUMBF manifest store inside a C2PA ``uuid`` box: after version/flags (4), the purpose
    (a NUL-terminated string) and, for purpose "manifest", a 64-bit merkle offset."""
    end = bytes(body[4:4 + 64]).find(b"\x00")
    if len(body) < 5 or end < 0:
        raise EvidenceError(f"BMFF: C2PA uuid box at byte {at} has no purpose string")
    purpose = bytes(body[4:4 + end])
    start = 4 + end + 1 + (8 if purpose == b"manifest" else 0)
    return body[start:]
