"""C2PA manifest stores: find the JUMBF superbox and read its description box, nothing more.

A JUMBF superbox (ISO/IEC 19566-5) is a box of type ``jumb`` whose first child is a description
box ``jumd``: a 16-byte content-type UUID, a toggles byte, then (toggle bit 1) a NUL-terminated
label. The C2PA manifest store is the superbox labelled ``c2pa`` whose UUID starts with the
bytes ``c2pa`` (C2PA spec, "Manifest store": 0x63327061-0011-0010-8000-00AA00389B71). Only the
headers are read: presence, label and declared size. Reading the claims is ``c2pa_reader``'s job.
"""
from __future__ import annotations

from typing import Optional

from aigid.provenance.containers import EvidenceError, Segment

__all__ = ["describe", "C2PA_UUID_PREFIX"]

C2PA_UUID_PREFIX = b"c2pa"
_MAX_LABEL = 256


def _box_header(box: memoryview, where: str) -> tuple[int, bytes, int]:
    """(declared size, type, header length) of the box at the start of ``box``."""
    if len(box) < 8:
        raise EvidenceError(f"{where}: JUMBF box header cut short ({len(box)} bytes)")
    size, btype, head = int.from_bytes(box[:4], "big"), bytes(box[4:8]), 8
    if size == 1:
        if len(box) < 16:
            raise EvidenceError(f"{where}: JUMBF box header cut short ({len(box)} bytes)")
        size, head = int.from_bytes(box[8:16], "big"), 16
    elif size == 0:
        size = len(box)
    if size < head:
        raise EvidenceError(f"{where}: JUMBF box declares {size} bytes, less than its header")
    return size, btype, head


def describe(segment: Segment) -> Optional[dict]:
    """``{"label", "c2pa", "bytes", "in"}`` for the superbox this segment starts, or None for a
    JPEG continuation packet (its header repeats the first packet's). ``EvidenceError`` when
    the box is not a well-formed JUMBF superbox."""
    if not segment.first:
        return None
    box, where = segment.data, segment.where
    size, btype, head = _box_header(box, where)
    if btype != b"jumb":
        raise EvidenceError(f"{where}: expected a JUMBF superbox ('jumb'), found {btype!r}")
    # In JPEG the superbox continues in later APP11 packets, so it may declare more than is here.
    if size > len(box) and segment.where != "jpeg:app11":
        raise EvidenceError(f"{where}: JUMBF box declares {size} bytes, only {len(box)} present")
    desc = box[head:min(size, len(box))]
    dsize, dtype, dhead = _box_header(desc, where)
    if dtype != b"jumd":
        raise EvidenceError(f"{where}: JUMBF superbox without its description box ('jumd')")
    if dsize > len(desc) or dsize < dhead + 17:
        raise EvidenceError(f"{where}: JUMBF description box of {dsize} bytes is malformed")
    body = desc[dhead:dsize]
    uuid, toggles = bytes(body[:16]), body[16]
    label = ""
    if toggles & 0x02:
        raw = bytes(body[17:17 + _MAX_LABEL])
        end = raw.find(b"\x00")
        if end < 0:
            raise EvidenceError(f"{where}: JUMBF label is not NUL-terminated within "
                                f"{_MAX_LABEL} bytes")
        label = raw[:end].decode("utf-8", "replace")
    is_c2pa = uuid.startswith(C2PA_UUID_PREFIX) and label == "c2pa"
    return {"label": label, "c2pa": is_c2pa, "bytes": size, "in": where}
