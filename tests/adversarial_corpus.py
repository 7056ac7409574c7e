"""A small, nasty corpus for the bulk-scanning data path (sources, decoding, batching, scanning).

Usage (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    from adversarial_corpus import build_corpus, build_list_file

    expected = build_corpus(tmp_path / "corpus")      # {item id -> "ok" | "error"}
    # scanning [tmp_path / "corpus"] must yield exactly these ids: "ok" ones scored, "error" ones
    # recorded with a reason (undecodable files, unreadable archives, symlink and hardlink
    # members, symlink loops).

Stable API (other test files import it):

- ``build_corpus(root: Path) -> dict[str, str]``: writes the corpus under ``root`` (created; must
  be empty or absent) and returns ``{id: "ok" | "error"}`` for scanning ``[root]`` with the
  default image extensions. Ids are exactly what ``aigid.data.sources.iter_items`` yields: the
  absolute normalised path of a file (``os.fsdecode``d: a non-UTF-8 name carries surrogate
  escapes), ``"<archive path>::<member name>"`` for an archive member, and the path itself for
  what cannot be enumerated (broken or truncated archive, symlink loop, dangling link).
- ``build_list_file(root: Path) -> tuple[Path, dict[str, str]]``: after ``build_corpus(root)``,
  writes ``root/lists/files.lst`` (relative, absolute, blank, comment and missing lines) and
  returns it with the expected outcomes of scanning ``[list_file]`` alone. ``.lst`` files met
  while walking a folder are *not* expanded (only list files given explicitly are), so this does
  not change ``build_corpus``'s expectations.
- ``jpeg_bytes(w, h, seed, **save_kw)`` / ``png_bytes(w, h, seed)``: valid noise images as bytes.
- ``bomb_png(width, height, gray=False)``: a tiny PNG whose header declares ``width x height``.
- ``EXIF_NAME`` / ``EXIF_STORED_SIZE``: the EXIF orientation-6 JPEG (stored 64x32: left half red,
  right half blue) whose displayed size is 32x64.
- ``nonutf8_supported(root) -> bool``: whether the filesystem accepted the non-UTF-8 file name.

Everything is deterministic (fixed seeds and sizes), tiny (< 200 kB in all) and built in well
under a second.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_NAME = "exif_rot6.jpg"
EXIF_STORED_SIZE = (64, 32)  # (width, height) as stored; displayed 32 wide, 64 high
NONUTF8_NAME = b"caf\xe9.jpg"

__all__ = ["build_corpus", "build_list_file", "nonutf8_supported", "EXIF_NAME", "EXIF_STORED_SIZE",
           "jpeg_bytes", "png_bytes", "bomb_png"]


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(w: int = 40, h: int = 30, seed: int = 0, **kw) -> bytes:
    """A valid RGB JPEG of noise (handy for tests that need image bytes)."""
    return _encode(_noise(w, h, seed), "JPEG", quality=90, **kw)


def png_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    return _encode(_noise(w, h, seed), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000, gray: bool = False) -> bytes:
    """A ~60-byte PNG whose header declares width x height pixels (10^10 by default); ``gray``
    declares 8-bit greyscale (a quarter of the memory should anything ever decode it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0 if gray else 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
    w, h = EXIF_STORED_SIZE
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _gray16_png() -> bytes:
    ramp = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")  # uint16 array -> mode I;16


def _palette_alpha_png() -> bytes:
    img = _noise(32, 24, 7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [_noise(24, 24, s).convert("P") for s in (11, 12, 13)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # set directly: TarFile.add would strip a leading "/"
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def _evil_tar(path: Path) -> dict[str, str]:
    arc = str(path)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _tar_add(tf, "../escape.jpg", jpeg_bytes(seed=21))
        _tar_add(tf, "/abs/evil.jpg", jpeg_bytes(seed=22))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        folder = tarfile.TarInfo("normal")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(folder)
        _tar_add(tf, "normal/ok.jpg", jpeg_bytes(seed=23))
        # Hardlinks: one to a regular member of this archive, one to a path outside it. Neither
        # is a regular file (TarInfo.isfile() is False), so a reader that only looks for symlinks
        # would drop them without a row.
        for name, target in (("hard.jpg", "normal/ok.jpg"), ("hard_out.jpg", "/etc/passwd")):
            hard = tarfile.TarInfo(name)
            hard.type, hard.linkname = tarfile.LNKTYPE, target
            tf.addfile(hard)
        _tar_add(tf, "normal/caption.txt", b"not an image: filtered out by extension")
        _tar_add(tf, "a/../../b.jpg", b"this is text, not a JPEG")
    return {f"{arc}::../escape.jpg": "ok", f"{arc}::/abs/evil.jpg": "ok",
            f"{arc}::link.jpg": "error", f"{arc}::normal/ok.jpg": "ok",
            f"{arc}::hard.jpg": "error", f"{arc}::hard_out.jpg": "error",
            f"{arc}::a/../../b.jpg": "error"}


def _targz(path: Path) -> dict[str, str]:
    with tarfile.open(path, "w:gz") as tf:
        _tar_add(tf, "x/one.jpg", jpeg_bytes(seed=31))
        _tar_add(tf, "x/two.png", png_bytes(seed=32))
    return {f"{path}::x/one.jpg": "ok", f"{path}::x/two.png": "ok"}


def _truncated_targz(path: Path) -> dict[str, str]:
    """First member whole, second member's data cut off, archive end missing."""
    raw = io.BytesIO()
    first, second = jpeg_bytes(64, 64, seed=41), jpeg_bytes(96, 96, seed=42)
    with tarfile.open(fileobj=raw, mode="w") as tf:
        _tar_add(tf, "first.jpg", first)
        _tar_add(tf, "second.jpg", second)
    data = raw.getvalue()
    cut = 512 + len(first) + (-len(first)) % 512 + 512 + len(second) // 2  # mid second's data
    path.write_bytes(gzip.compress(data[:cut], mtime=0))
    return {f"{path}::first.jpg": "ok", f"{path}::second.jpg": "error", str(path): "error"}


def _zip(path: Path) -> dict[str, str]:
    good, bad = jpeg_bytes(seed=51), jpeg_bytes(seed=52)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("good.jpg", good)
        zf.writestr("corrupt.jpg", bad)
        zf.writestr("sub/", b"")  # a directory entry: skipped
    blob = bytearray(path.read_bytes())
    at = blob.find(bad) + len(bad) // 2
    blob[at:at + 8] = bytes(b ^ 0xFF for b in blob[at:at + 8])  # CRC-32 mismatch on read
    path.write_bytes(bytes(blob))
    return {f"{path}::good.jpg": "ok", f"{path}::corrupt.jpg": "error"}


def nonutf8_supported(root: Path) -> bool:
    return os.path.exists(os.path.join(os.fsencode(root), NONUTF8_NAME))


def build_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under ``root``; return ``{id: "ok" | "error"}`` for scanning ``[root]``."""
    root = Path(os.path.abspath(root))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"build_corpus needs an empty folder, {root} is not")
    expected: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[str(path)] = outcome
        return path

    good = put("good.jpg", jpeg_bytes(48, 36, seed=1), "ok")
    put("good.png", png_bytes(seed=2), "ok")
    put("good.webp", _encode(_noise(40, 30, 3), "WEBP", quality=90), "ok")
    put("upper.JPEG", jpeg_bytes(seed=4), "ok")
    put("gray.jpg", _encode(_noise(40, 30, 5, "L"), "JPEG"), "ok")
    put("progressive.jpg", jpeg_bytes(64, 48, seed=6, progressive=True), "ok")
    put("truncated.jpg", jpeg_bytes(64, 64, seed=8)[:600], "error")
    put("empty.jpg", b"", "error")
    put("text.jpg", b"hello, I am plain text with a .jpg name\n", "error")
    put("bomb.png", bomb_png(), "error")
    put("cmyk.jpg", _encode(_noise(40, 30, 9, "CMYK"), "JPEG"), "ok")
    put("gray16.png", _gray16_png(), "ok")
    put("animated.gif", _animated_gif(), "ok")
    put(EXIF_NAME, _exif_rotated_jpeg(), "ok")
    put("palette_alpha.png", _palette_alpha_png(), "ok")
    put("notes.txt", b"not an image, filtered out by extension", "ok")
    del expected[str(root / "notes.txt")]  # written, but never enumerated
    put("nested/deeper/inner.png", png_bytes(seed=10), "ok")
    put("album.jpg/inside.png", png_bytes(seed=12), "ok")  # a folder with an image-like name

    shards = root / "shards"
    shards.mkdir()
    expected.update(_evil_tar(shards / "evil.tar"))
    expected.update(_targz(shards / "pack.tar.gz"))
    expected.update(_truncated_targz(shards / "truncated.tgz"))
    expected.update(_zip(shards / "pack.zip"))
    (shards / "broken.tar").write_bytes(b"definitely not a tar archive" * 40)
    (shards / "broken.zip").write_bytes(b"PK\x03\x04 but then garbage" * 10)
    expected[str(shards / "broken.tar")] = expected[str(shards / "broken.zip")] = "error"

    (root / "link_good.jpg").symlink_to(good.name)  # symlink to a file: followed
    expected[str(root / "link_good.jpg")] = "ok"
    (root / "dangling.jpg").symlink_to("missing-target.jpg")
    expected[str(root / "dangling.jpg")] = "error"
    (root / "nested" / "loop").symlink_to(".")  # directory symlink loop
    expected[str(root / "nested" / "loop")] = "error"

    try:
        raw = os.path.join(os.fsencode(root), NONUTF8_NAME)
        with open(raw, "wb") as fh:
            fh.write(jpeg_bytes(seed=13))
        expected[os.fsdecode(raw)] = "ok"
    except (OSError, UnicodeError):
        pass  # the filesystem refuses non-UTF-8 names: that case is skipped
    return expected


def build_list_file(root: Path) -> tuple[Path, dict[str, str]]:
    """Write ``root/lists/files.lst`` (after ``build_corpus(root)``); return it and its outcomes."""
    root = Path(os.path.abspath(root))
    lists = root / "lists"
    lists.mkdir(exist_ok=True)
    lst = lists / "files.lst"
    lines = ["# a comment, then a blank line", "", "../good.jpg", f"{root / 'good.png'}",
             "../shards/pack.tar.gz", "../text.jpg", "../does-not-exist.jpg", "  ../gray.jpg  "]
    lst.write_text("\n".join(lines) + "\n")
    expected = {str(root / "good.jpg"): "ok", str(root / "good.png"): "ok",
                str(root / "text.jpg"): "error", str(root / "does-not-exist.jpg"): "error",
                str(root / "gray.jpg"): "ok"}
    pack = root / "shards" / "pack.tar.gz"
    expected.update({f"{pack}::x/one.jpg": "ok", f"{pack}::x/two.png": "ok"})
    return lst, expected
