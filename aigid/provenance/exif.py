"""The few EXIF tags that name a generator: IFD0 ``Make``/``Model``/``Software`` and the Exif
IFD's ``UserComment`` (where Stable Diffusion web UI writes its parameters into JPEG/WebP).

A bounded TIFF reader (TIFF 6.0 section 2; EXIF 2.32 4.6): every offset is checked against the
block, entry counts are capped, strings are cut at ``MAX_TEXT``. A broken block raises
``EvidenceError``.
"""
from __future__ import annotations

from typing import Optional

from aigid.provenance.containers import EvidenceError

__all__ = ["read_tags", "MAX_TEXT", "MAX_COMMENT"]

MAX_TEXT = 256  # characters kept of Make/Model/Software
MAX_COMMENT = 64 << 10  # bytes of UserComment looked at
_MAX_ENTRIES = 1024
_ASCII_TAGS = {0x010F: "make", 0x0110: "model", 0x0131: "software"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


def _ifd(tiff: memoryview, at: int, order: str, where: str) -> dict[int, tuple[int, memoryview]]:
    """tag -> (type, value bytes) of the IFD at ``at``."""
    n = len(tiff)
    if at < 8 or at + 2 > n:
        raise EvidenceError(f"{where}: EXIF IFD offset {at} outside the {n}-byte block")
    count = int.from_bytes(tiff[at:at + 2], order)
    if count > _MAX_ENTRIES or at + 2 + 12 * count > n:
        raise EvidenceError(f"{where}: EXIF IFD at {at} declares {count} entries that do not fit")
    out: dict[int, tuple[int, memoryview]] = {}
    for k in range(count):
        e = at + 2 + 12 * k
        tag, typ = int.from_bytes(tiff[e:e + 2], order), int.from_bytes(tiff[e + 2:e + 4], order)
        size = _TYPE_SIZE.get(typ, 1) * int.from_bytes(tiff[e + 4:e + 8], order)
        if size <= 4:
            value = tiff[e + 8:e + 8 + size]
        else:
            off = int.from_bytes(tiff[e + 8:e + 12], order)
            if off + size > n:
                if tag in _ASCII_TAGS or tag in (_EXIF_IFD, _USER_COMMENT):
                    raise EvidenceError(f"{where}: EXIF tag 0x{tag:04X} points past the block")
                continue  # a tag we do not read: its damage is not ours to report
            value = tiff[off:off + size]
        out[tag] = (typ, value)
    return out


def _ascii(value: memoryview) -> Optional[str]:
    text = bytes(value[:MAX_TEXT * 4]).split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    return text[:MAX_TEXT] or None


def _comment(value: memoryview) -> Optional[str]:
    """EXIF 2.32 table 9: an 8-byte character code, then the text."""
    code, body = bytes(value[:8]), bytes(value[8:8 + MAX_COMMENT])
    if code.startswith(b"UNICODE"):
        # UCS-2 without a stated byte order: the zero bytes of ASCII text tell which half is high.
        be = body[0::2].count(0) >= body[1::2].count(0)
        text = body.decode("utf-16-be" if be else "utf-16-le", "replace")
    else:
        text = body.decode("utf-8", "replace")
    return text.strip("\x00 ") or None


def read_tags(tiff: memoryview | bytes, where: str = "exif") -> dict[str, str]:
    """``make``, ``model``, ``software``, ``user_comment`` (those present) of a TIFF block."""
    tiff = memoryview(tiff)
    if len(tiff) < 8 or bytes(tiff[:4]) not in (b"II*\x00", b"MM\x00*"):
        raise EvidenceError(f"{where}: EXIF block without a TIFF header")
    order = "little" if tiff[0] == 0x49 else "big"
    ifd0 = _ifd(tiff, int.from_bytes(tiff[4:8], order), order, where)
    tags: dict[str, str] = {}
    for tag, name in _ASCII_TAGS.items():
        if tag in ifd0 and (text := _ascii(ifd0[tag][1])):
            tags[name] = text
    if _EXIF_IFD in ifd0 and len(ifd0[_EXIF_IFD][1]) >= 4:
        sub = _ifd(tiff, int.from_bytes(ifd0[_EXIF_IFD][1][:4], order), order, where)
        if _USER_COMMENT in sub and (text := _comment(sub[_USER_COMMENT][1])):
            tags["user_comment"] = text
    return tags
