"""The shared JPEG marker walk (aigid.data.jpeg_markers), used by DALI routing and provenance."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from aigid.data.jpeg_markers import JpegStructureError, segments


def _jpeg(**save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 40)).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_segments_in_file_order_up_to_the_scan_header():
    """Catches a walk that runs into the entropy-coded data after SOS (it would read image bytes
    as markers) or drops segments: PIL writes the EXIF APP1 before the quantisation tables, the
    frame header and the scan."""
    data = _jpeg(exif=Image.Exif().tobytes())
    markers = [m for m, _, _ in segments(data)]
    assert markers.index(0xE1) < markers.index(0xDB) < markers.index(0xC0)
    assert markers[-1] == 0xDA and markers.count(0xDA) == 1
    sof = next(p for m, _, p in segments(data) if m == 0xC0)
    assert int.from_bytes(sof[1:3], "big") == 6 and int.from_bytes(sof[3:5], "big") == 8


def test_fill_bytes_and_standalone_markers_are_skipped_and_eoi_ends():
    """Catches fill bytes (0xFF 0xFF) or RSTn/TEM read as segments with a length, and EOI
    before any scan treated as an error."""
    data = b"\xff\xd8" + b"\xff\xff\xff\x01\xff\xd0" + b"\xff\xe0\x00\x04ab" + b"\xff\xd9"
    assert [(m, bytes(p)) for m, _, p in segments(data)] == [(0xE0, b"ab")]


@pytest.mark.parametrize("tail,reason", [
    (b"\xff\xe0\x00\x10abc", "runs past the end"),
    (b"\xff\xe0\x00", "inside a segment header"),
    (b"\xff\xe0\x00\x01", "has length 1"),
    (b"\x00\x00", "no marker at byte 2"),
    (b"", "ends inside its header"),
])
def test_broken_structure_raises_with_the_reason(tail, reason):
    """Catches a walk that reads past the end of truncated bytes or loops on a zero length."""
    with pytest.raises(JpegStructureError, match=reason):
        list(segments(b"\xff\xd8" + tail))
