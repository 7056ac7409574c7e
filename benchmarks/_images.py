"""Synthetic images for the data-path benchmarks."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_like_jpeg(seed: int, width: int = 512, height: int = 384) -> bytes:
    """A smooth random image plus mild noise, saved at quality 90: JPEG sizes like a photo's
    (~30-60 kB at 512×384), not noise's."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC)
    arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3),
                                                         dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_photo_jpegs(root, n: int = 64):
    """``n`` photo-like 512×384 JPEGs named ``0.jpg`` … in folder ``root``; returns ``root``."""
    for i in range(n):
        (root / f"{i}.jpg").write_bytes(photo_like_jpeg(i))
    return root
