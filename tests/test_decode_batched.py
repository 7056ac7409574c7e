"""The CPU scan path normalises a whole chunk at once: its pixels must equal ``predict``'s
per-image preprocessing (``load_rgb`` + ``eval_transform``) bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.data.decode_cpu import ScanDataset
from aigid.data.images import load_rgb
from aigid.data.transforms import eval_transform

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Sizes above and below the crop, grey, RGBA and palette images, JPEG and PNG."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    shapes = [(40, 52, "RGB", "jpg"), (64, 30, "RGB", "png"), (12, 20, "RGB", "png"),
              (33, 33, "L", "png"), (45, 38, "RGBA", "png"), (50, 41, "P", "png"),
              (70, 90, "RGB", "jpg")]
    for i, (h, w, mode, ext) in enumerate(shapes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        img.save(root / f"{i}.{ext}")
    return root


def _rows(root, pp, dtype, batch_size=3):
    out = {}
    for chunk in ScanDataset([root], pp, batch_size, dtype=dtype):
        assert not chunk.errors
        if isinstance(chunk.pixels, torch.Tensor):
            assert chunk.pixels.dtype == dtype and chunk.pixels.is_contiguous()
        out.update((m.id, px) for m, px in zip(chunk.meta, chunk.pixels))
    return out


@pytest.mark.parametrize("mode", ["shortest", "squash", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_pixels_equal_per_image_transform(folder, mode, dtype):
    """Catches a batched path that permutes the wrong axes (transposed or channel-swapped
    images), normalises with the channels' mean/std misaligned, scales uint8 differently, or
    casts to the requested dtype before normalising: any of these changes scores vs predict."""
    pp = {"size": 24, "resize_mode": mode, "interpolation": "bicubic", "mean": MEAN, "std": STD}
    transform = eval_transform(pp)
    rows = _rows(folder, pp, dtype)
    assert len(rows) == 7
    for ident, px in rows.items():
        want = transform(load_rgb(ident)).to(dtype)
        assert torch.equal(px, want), ident


def test_aspect_keeping_preprocess_still_yields_per_image_tensors(folder):
    """Catches the chunk path stacking images of different sizes (UniGenDet's aspect-keeping
    'bagel' resize), which must stay a list, each equal to the per-image transform."""
    pp = {"size": 32, "max_size": 64, "stride": 16, "resize_mode": "bagel",
          "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    transform = eval_transform(pp)
    rows = _rows(folder, pp, torch.float32, batch_size=7)
    assert len({tuple(px.shape) for px in rows.values()}) > 1
    for ident, px in rows.items():
        assert torch.equal(px, transform(load_rgb(ident))), ident
