"""A JPEG's marker segments (ITU-T T.81 B.1), walked once for two readers: the DALI routing
check (``aigid.data.decode_dali.jpeg_info``: frame header, EXIF orientation, Adobe transform)
and the provenance reader (``aigid.provenance.containers``: APP1 EXIF/XMP, APP11 JUMBF)."""
from __future__ import annotations

from typing import Iterator, Union

__all__ = ["JpegStructureError", "segments", "STANDALONE"]

STANDALONE = {0x01, 0xD8} | set(range(0xD0, 0xD8))  # TEM, SOI, RSTn: no length field
SOS, EOI = 0xDA, 0xD9

Bytes = Union[bytes, memoryview]


class JpegStructureError(ValueError):
    """The marker structure is broken (the reason, with the byte offset, is the message)."""


def segments(data: Bytes, start: int = 2) -> Iterator[tuple[int, int, Bytes]]:
    """``(marker, offset, payload)`` of each length-carrying segment from ``start`` (just past
    SOI) in file order; fill bytes and standalone markers are skipped. Ends after yielding SOS
    (its payload is the scan header; entropy-coded data follows) or at EOI. Raises
    ``JpegStructureError`` for a missing marker, a truncated header or segment, or a length
    under 2, so a reader never runs past the end of the bytes."""
    n, i = len(data), start
    while True:
        if i + 2 > n:
            raise JpegStructureError("JPEG: the file ends inside its header segments")
        if data[i] != 0xFF:
            raise JpegStructureError(f"JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in STANDALONE:
            i += 2
            continue
        if marker == EOI:  # before any scan: nothing more to read
            return
        if i + 4 > n:
            raise JpegStructureError("JPEG: the file ends inside a segment header")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        end = i + 2 + length
        if length < 2:
            raise JpegStructureError(f"JPEG: segment 0x{marker:02X} at byte {i} has length {length}")
        if end > n:
            raise JpegStructureError(f"JPEG: segment 0x{marker:02X} at byte {i} ({length} bytes) "
                                     "runs past the end of the file")
        yield marker, i, data[i + 4:end]
        if marker == SOS:
            return
        i = end
