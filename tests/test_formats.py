"""Image formats beyond the classic ones (AVIF, HEIF/HEIC, JPEG XL), scanning by content
(``sniff``), and the count of files left out as not images.

Tolerances: HEIF and JPEG XL are written losslessly here, so they decode to the source pixels and
must score like the source PNG to 1e-6. AVIF is lossy in Pillow (max 3 grey levels off on this
gradient), so an AVIF must score like a PNG of *its own decoded pixels* to 1e-6 (same pipeline),
and like the source PNG to 0.01.
"""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import aigid
from aigid.data import images as images_mod
from aigid.data.sources import image_format
from aigid.scanning.local import scan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector(tiny_mirage_folder):
    return aigid.load_detector(str(tiny_mirage_folder))


def _pixels() -> np.ndarray:
    """A smooth 40x48 gradient: lossy codecs stay within a few grey levels of it."""
    y, x = np.mgrid[0:40, 0:48]
    return np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8)


def _name(ident: str) -> str:
    """An id without its folder: ``x.png``, or ``shard.tar::member`` for an archive member."""
    path, sep, member = ident.partition("::")
    return Path(path).name + sep + member


def _scan(paths, detector, **kw) -> tuple[dict, dict]:
    stats: dict = {}
    results = {_name(r.id): r for r in scan(paths, detector, batch_size=8, progress=False,
                                               stats=stats, **{"num_workers": 0, **kw})}
    return results, stats


def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels()).save(buf, fmt, **kw)
    return buf.getvalue()


def _decoded_png(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _check_scored_like_png(tmp_path, detector, name: str, data: bytes, lossless: bool):
    (tmp_path / name).write_bytes(data)
    Image.fromarray(_pixels()).save(tmp_path / "source.png")
    (tmp_path / "decoded.png").write_bytes(_decoded_png(data))
    results, stats = _scan([tmp_path], detector)
    assert set(results) == {name, "source.png", "decoded.png"}
    assert all(r.error is None for r in results.values()), {k: r.error for k, r in results.items()}
    got, same, src = (results[k].score for k in (name, "decoded.png", "source.png"))
    assert got == pytest.approx(same, abs=1e-6)
    assert got == pytest.approx(src, abs=1e-6 if lossless else 1e-2)
    assert stats["skipped_not_image"] == {}


def test_avif_is_scanned_by_default_and_scored_like_its_pixels(detector, tmp_path):
    """Catches AVIF missing from the scanner's extension list (the file silently skipped, no row)
    or decoded differently from the same pixels as PNG."""
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec (test_avif_without_codec covers the error)")
    data = _encoded("AVIF", quality=100, subsampling="4:4:4")
    assert np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), int)
                  - _pixels()).max() <= 3
    _check_scored_like_png(tmp_path, detector, "photo.avif", data, lossless=False)


def test_avif_without_codec_is_an_error_row_saying_so(detector, tmp_path, monkeypatch):
    """Catches an AVIF on a Pillow built without libavif reported as a vague 'not a recognised
    image' (or skipped) instead of saying that this Pillow cannot decode AVIF."""
    # An AVIF header (generic HEIF major brand "mif1", AVIF as compatible brand) and junk.
    data = b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf" + bytes(64)
    assert image_format(data) == "avif"
    (tmp_path / "phone.avif").write_bytes(data)
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "AVIF"])
    monkeypatch.setattr(images_mod.features, "check", lambda name: False)
    results, _ = _scan([tmp_path], detector)
    err = results["phone.avif"].error
    assert err and "AVIF" in err and "Pillow" in err and "libavif" in err


def test_heic_without_plugin_is_an_error_row_naming_the_extra(detector, tmp_path, monkeypatch):
    """Catches a .heic scanned without pillow-heif being skipped silently or reported as a bare
    'not a recognised image format' instead of naming the extra to install."""
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # header, no image
    (tmp_path / "IMG_0001.HEIC").write_bytes(data)
    images_mod.register_plugins()  # the others now, not into the Image.ID copy patched below
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails: plugin "not installed"
    monkeypatch.setattr(images_mod, "_registered", {})  # as in a fresh process
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])  # not registered
    results, _ = _scan([tmp_path], detector)
    err = results["IMG_0001.HEIC"].error
    assert err and "pillow-heif" in err and "aigid[formats]" in err


def test_heif_is_scored_like_the_same_pixels_as_png(detector, tmp_path):
    """Catches the HEIF plugin not registered by the scanner (error rows), or HEIF pixels
    decoded differently (colour matrix, chroma) from the same image as PNG."""
    heif = pytest.importorskip("pillow_heif")
    heif.register_heif_opener()  # to write the file; the scanner registers it by itself
    data = _encoded("HEIF", quality=-1, chroma=444, matrix_coefficients=0)  # lossless
    _check_scored_like_png(tmp_path, detector, "phone.heic", data, lossless=True)


def test_jxl_is_scored_like_the_same_pixels_as_png(detector, tmp_path):
    """Catches JPEG XL missing from the extension list or its plugin not loaded (error rows), or
    JXL pixels decoded differently from the same image as PNG."""
    pytest.importorskip("pillow_jxl")  # importing it registers the codec
    data = _encoded("JXL", lossless=True)
    _check_scored_like_png(tmp_path, detector, "art.jxl", data, lossless=True)


def test_plugins_register_themselves_in_a_fresh_process(tmp_path):
    """Catches plugins registered only where aigid's caller imported them: a fresh process (a
    spawned DataLoader worker) must decode HEIF and JXL through load_rgb alone."""
    heif = pytest.importorskip("pillow_heif")
    pytest.importorskip("pillow_jxl")
    heif.register_heif_opener()
    (tmp_path / "a.heic").write_bytes(_encoded("HEIF", quality=-1, chroma=444,
                                               matrix_coefficients=0))
    (tmp_path / "a.jxl").write_bytes(_encoded("JXL", lossless=True))
    code = ("import sys; from aigid.data.images import load_rgb; "
            "assert 'pillow_heif' not in sys.modules; "
            "print([load_rgb(p).size for p in sys.argv[1:]])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.heic"),
                          str(tmp_path / "a.jxl")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(48, 40), (48, 40)]"


def _mixed_folder(root: Path) -> None:
    root.mkdir()
    Image.fromarray(_pixels()).save(root / "real.png")
    Image.fromarray(_pixels()).save(root / "camera.dat", "JPEG")  # a JPEG with a wrong name
    Image.fromarray(_pixels()).save(root / "noext", "PNG")  # a PNG with no extension
    (root / "notes.txt").write_text("a caption, not an image")
    (root / "meta.json").write_text("{}")
    (root / "README").write_text("no extension, no image")
    with tarfile.open(root / "shard.tar", "w") as tf:
        for name, payload in (("m/inside.bin", _encoded("JPEG")), ("m/cap.txt", b"caption"),
                              ("m/x.png", _encoded("PNG"))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_sniff_scans_images_by_content_whatever_their_name(detector, tmp_path):
    """Catches --sniff still filtering by extension (a JPEG named .dat, a PNG without extension,
    a JPEG member named .bin missed) or scoring text files as error rows instead of skipping."""
    root = tmp_path / "mixed"
    _mixed_folder(root)
    results, stats = _scan([root], detector, sniff=True)
    assert set(results) == {"real.png", "camera.dat", "noext", "shard.tar::m/inside.bin",
                            "shard.tar::m/x.png"}
    assert all(r.error is None and r.score is not None for r in results.values())
    assert results["noext"].score == pytest.approx(results["real.png"].score, abs=1e-6)
    assert stats["skipped_not_image"] == {".txt": 2, ".json": 1, "(none)": 1}


def test_without_sniff_the_extension_list_rules(detector, tmp_path):
    """Catches sniffing switched on by default (a .dat file scanned without --sniff), or files
    left out by extension missing from the summary."""
    root = tmp_path / "mixed"
    _mixed_folder(root)
    results, stats = _scan([root], detector)
    assert set(results) == {"real.png", "shard.tar::m/x.png"}
    assert stats["skipped_not_image"] == {".dat": 1, "(none)": 2, ".txt": 2, ".json": 1,
                                          ".bin": 1}


def test_skipped_counts_are_exact_with_workers(detector, tmp_path):
    """Catches the non-image count multiplied by the number of DataLoader workers (every worker
    walks every folder) or lost with them (counts kept in the workers, not sent back)."""
    root = tmp_path / "mixed"
    _mixed_folder(root)
    for k in range(5):
        (root / f"cap{k}.txt").write_text("caption")
    results, stats = _scan([root], detector, num_workers=2)
    assert set(results) == {"real.png", "shard.tar::m/x.png"}
    assert stats["skipped_not_image"] == {".dat": 1, "(none)": 2, ".txt": 7, ".json": 1,
                                          ".bin": 1}


@pytest.mark.parametrize("head, fmt", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "png"),
    (b"GIF89a\x01\x00", "gif"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp"),
    (b"BM" + bytes(12) + (40).to_bytes(4, "little"), "bmp"),
    (b"BM is how this text file starts", None),
    (b"II*\x00\x08\x00\x00\x00", "tiff"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "avif"),
    (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "avif"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heif"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),  # an MP4 video
    (b"\xff\x0a\xfa\x7f", "jxl"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n\x00\x00", "jxl"),
    (b'{"caption": "x"}', None),
])
def test_image_format_signatures(head, fmt):
    """Catches a wrong or missing magic-byte signature: an AVIF whose major brand is the generic
    'mif1' taken for HEIF, an MP4 (also ISO-BMFF) or text starting 'BM' taken for an image."""
    assert image_format(head) == fmt
