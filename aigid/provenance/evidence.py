"""``read_evidence(bytes)``: what an image file says about its own origin, in one small dict.

Combines the container walk (``containers``), C2PA manifest presence (``jumbf``; claims via
``c2pa_reader`` when ``c2pa-python`` is installed), IPTC ``DigitalSourceType`` in XMP (``xmp``),
and generator fingerprints in PNG text and EXIF (``generator``, ``exif``). The ``provenance``
summary:

- ``declared-ai``: a C2PA action, an XMP ``DigitalSourceType`` in ``xmp.AI_TYPES``, or a
  generator's own metadata says the image was generated (``declared_by`` lists which);
- ``declared-camera``: a capture claim (``DigitalSourceType`` in ``xmp.CAPTURE_TYPES``, in XMP or
  in a C2PA manifest that did not fail validation) and no AI declaration;
- ``none``: neither (the normal case: re-encoding strips metadata, so absence says nothing).

Declarations are what the file claims, not proof; a C2PA manifest's ``validation_state`` says
whether its signature held. Any broken structure gives ``{"evidence_error": reason}``; this
function never raises. Nothing here decodes pixels.
"""
from __future__ import annotations

import json
import logging
import zlib
from typing import Any, Optional

from aigid.provenance import c2pa_reader, exif, generator, jumbf, xmp
from aigid.provenance.containers import MIME, EvidenceError, walk

__all__ = ["read_evidence", "evidence_json", "provenance_of", "DECLARED_AI", "DECLARED_CAMERA",
           "NONE"]

log = logging.getLogger(__name__)

DECLARED_AI, DECLARED_CAMERA, NONE = "declared-ai", "declared-camera", "none"
MAX_MANIFEST_FILE = 256 << 20  # bytes: larger files are not handed to c2pa-python


def read_evidence(data: bytes, *, read_c2pa: Optional[bool] = None) -> dict[str, Any]:
    """The evidence in ``data`` (see the module docstring). ``read_c2pa``: read manifest claims
    with c2pa-python (default: when it is installed); False reports presence only."""
    try:
        return _read(data, c2pa_reader.available() if read_c2pa is None else read_c2pa)
    except EvidenceError as err:
        return {"evidence_error": str(err)}
    except Exception as err:  # a reader bug must not stop a scan: say what failed instead
        log.debug("evidence reader failed", exc_info=True)
        return {"evidence_error": f"{type(err).__name__}: {err}"[:300]}


def evidence_json(data: bytes, **kwargs: Any) -> str:
    """``read_evidence`` as compact JSON text (what the results store keeps)."""
    return json.dumps(read_evidence(data, **kwargs), separators=(",", ":"), sort_keys=True)


def provenance_of(evidence: Optional[str]) -> str:
    """The ``provenance`` summary of stored evidence JSON (``none`` for missing or errors)."""
    if not evidence:
        return NONE
    try:
        return str(json.loads(evidence).get("provenance", NONE))
    except (ValueError, AttributeError):
        return NONE


def _read(data: bytes, read_c2pa: bool) -> dict[str, Any]:
    fmt, segments = walk(data)
    out: dict[str, Any] = {}
    ai: list[str] = []
    camera: list[str] = []
    source_types: list[str] = []
    generators: list[dict] = []

    manifests = [d for d in (jumbf.describe(s) for s in segments if s.kind == "jumbf")
                 if d is not None and d["c2pa"]]
    if manifests:
        c2pa = {"present": True, "in": manifests[0]["in"], "bytes": manifests[0]["bytes"]}
        if read_c2pa and len(data) <= MAX_MANIFEST_FILE:
            c2pa.update(c2pa_reader.read_manifest(data, MIME[fmt]))
        for action in c2pa.get("actions", []):
            code = action.get("digital_source_type")
            if code in xmp.AI_TYPES:
                ai.append(f"c2pa:{code}")
            elif code in xmp.CAPTURE_TYPES and c2pa.get("validation_state") != "Invalid":
                camera.append(f"c2pa:{code}")
        out["c2pa"] = c2pa

    for seg in segments:
        if seg.kind == "xmp":
            _from_xmp(seg.data, seg.where, source_types, generators)
        elif seg.kind == "exif":
            tags = exif.read_tags(seg.data, seg.where)
            shown = {k: v for k, v in tags.items() if k != "user_comment"}  # may hold a prompt
            if shown:
                out.setdefault("exif", shown)
            generators += generator.from_exif(tags, seg.where)
    if fmt == "png":
        text = generator.png_text(segments)
        generators += generator.from_png_text(text)
        for seg in segments:  # XMP in iTXt "XML:com.adobe.xmp": read whole under the XMP cap
            if seg.kind == "itext" and bytes(seg.data[:18]) == b"XML:com.adobe.xmp\x00":
                _from_xmp(_itxt_body(seg), seg.where, source_types, generators)

    if source_types:
        out["digital_source_type"] = source_types
        ai += [f"xmp:{c}" for c in source_types if c in xmp.AI_TYPES]
        camera += [f"xmp:{c}" for c in source_types if c in xmp.CAPTURE_TYPES]
    if generators:
        out["generator"] = generators
        ai += [g["in"] for g in generators]
    if ai:
        out["provenance"], out["declared_by"] = DECLARED_AI, ai
    elif camera:
        out["provenance"], out["declared_by"] = DECLARED_CAMERA, camera
    else:
        out["provenance"] = NONE
    return out


def _from_xmp(packet: memoryview | bytes, where: str, source_types: list[str],
              generators: list[dict]) -> None:
    for code in xmp.digital_source_types(packet, where):
        if code not in source_types:
            source_types.append(code)
    name = generator.known_generator(xmp.creator_tool(packet, where))
    if name is not None:
        generators.append({"name": name, "in": f"{where}:CreatorTool"})


def _itxt_body(seg) -> memoryview | bytes:
    """The text of an iTXt chunk (PNG spec 11.3.4.5), inflated under the XMP cap."""
    body = seg.data[18:]
    if len(body) < 2:
        raise EvidenceError(f"{seg.where}: iTXt XMP chunk cut short")
    compressed = body[0]
    rest = body[2:]
    # skip the language tag and the translated keyword (two NUL-terminated strings, short)
    head = bytes(rest[:1024])
    first = head.find(b"\x00")
    second = head.find(b"\x00", first + 1) if first >= 0 else -1
    if second < 0:
        raise EvidenceError(f"{seg.where}: iTXt XMP chunk is malformed")
    text = rest[second + 1:]
    if not compressed:
        return text
    if len(text) > xmp.MAX_PACKET:  # deflate never shrinks XMP text below its compressed size
        raise EvidenceError(f"{seg.where}: compressed XMP of {len(text)} bytes exceeds the "
                            f"{xmp.MAX_PACKET}-byte cap")
    d = zlib.decompressobj()
    try:
        out = d.decompress(text, xmp.MAX_PACKET + 1)
    except zlib.error as err:
        raise EvidenceError(f"{seg.where}: compressed XMP does not inflate ({err})") from None
    return out  # over the cap: xmp refuses it with the size
