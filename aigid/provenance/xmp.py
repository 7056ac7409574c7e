"""IPTC ``DigitalSourceType`` (and the XMP ``CreatorTool``) in an XMP packet, by byte pattern.

An XMP packet is RDF/XML; the property may be written as an attribute
(``Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/..."``), as an
element with text, or as an element with ``rdf:resource``. A regular expression over the bytes
finds all three without an XML parser (no entity expansion, no DOM of a hostile packet), and the
packet is refused above ``MAX_PACKET`` before it is copied or searched.

Vocabulary: IPTC NewsCodes "Digital Source Type" (https://cv.iptc.org/newscodes/digitalsourcetype/);
the values that declare generation and capture are in ``AI_TYPES`` and ``CAPTURE_TYPES``.
"""
from __future__ import annotations

import re
from typing import Optional

from aigid.provenance.containers import EvidenceError

__all__ = ["MAX_PACKET", "AI_TYPES", "CAPTURE_TYPES", "digital_source_types", "creator_tool",
           "short_type"]

MAX_PACKET = 4 << 20  # bytes; real packets are a few kB (a thumbnail makes them ~100 kB)

AI_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia",
                      "algorithmicMedia"})
CAPTURE_TYPES = frozenset({"digitalCapture", "negativeFilm", "positiveFilm", "print",
                           "compositeCapture"})

_VALUE = rb'([^"\'<>]{1,512})'
_DST = re.compile(rb'DigitalSourceType\s*(?:=\s*["\']' + _VALUE + rb'["\']'
                  rb'|>\s*([^<\s][^<]{0,511})<'
                  rb'|\s[^>]{0,512}?rdf:resource\s*=\s*["\']' + _VALUE + rb'["\'])')
_TOOL = re.compile(rb'CreatorTool\s*(?:=\s*["\']' + _VALUE + rb'["\']|>\s*([^<\s][^<]{0,511})<)')


def short_type(value: str) -> str:
    """``trainedAlgorithmicMedia`` from the NewsCodes URI (or the bare code as it is)."""
    return value.strip().rstrip("/").rsplit("/", 1)[-1]


def _packet(data: memoryview | bytes, where: str) -> bytes:
    if len(data) > MAX_PACKET:
        raise EvidenceError(f"{where}: XMP packet of {len(data)} bytes exceeds the "
                            f"{MAX_PACKET}-byte cap")
    return bytes(data)


def digital_source_types(data: memoryview | bytes, where: str = "xmp") -> list[str]:
    """The ``DigitalSourceType`` codes in the packet, in order, without duplicates."""
    found: list[str] = []
    for m in _DST.finditer(_packet(data, where)):
        raw = next(g for g in m.groups() if g is not None)
        code = short_type(raw.decode("utf-8", "replace"))
        if code and code not in found:
            found.append(code[:200])
    return found


def creator_tool(data: memoryview | bytes, where: str = "xmp") -> Optional[str]:
    """The packet's ``xmp:CreatorTool`` (the software that made the file), if any."""
    m = _TOOL.search(_packet(data, where))
    if m is None:
        return None
    raw = next(g for g in m.groups() if g is not None)
    return raw.decode("utf-8", "replace").strip()[:200] or None
