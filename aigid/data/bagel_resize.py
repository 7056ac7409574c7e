"""BAGEL's aspect-preserving resize (``MaxLongEdgeMinShortEdgeResize`` in BAGEL/UniGenDet's
``data/transforms.py``): no crop, the longest side at most ``max_size``, the shortest at least
``min_size``, both sides multiples of ``stride``, at most ``max_pixels`` pixels; bicubic with
antialias. UniGenDet sees images through it twice: ``(1024, 512, 16)`` gives the VAE image and
``(980, 224, 14)`` applied to *that result* gives the SigLIP image (the public ``fakevlm_test.py``
and ``demo.py``), so every image has its own token grids (512² → 32×32 latent, 37×37 ViT tokens).
"""
from __future__ import annotations

from typing import Union

import torch
from PIL import Image

__all__ = ["BAGEL_MAX_PIXELS", "bagel_size", "BagelResize"]

BAGEL_MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform's default pixel budget


def _divisible(value: float, stride: int) -> int:
    # Python's round() is round-half-even, as in the upstream code (735/14 = 52.5 → 52).
    return max(stride, int(round(value / stride) * stride))


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _divisible(round(width * scale), stride), _divisible(round(height * scale), stride)


def bagel_size(width: int, height: int, max_size: int, min_size: int, stride: int,
               max_pixels: int | None = BAGEL_MAX_PIXELS) -> tuple[int, int]:
    """(new_width, new_height) of a ``width`` × ``height`` image under BAGEL's rule."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = max(min(max_size / max(width, height), 1.0), min_size / min(width, height))
    w, h = _scaled(width, height, scale, stride)
    if max_pixels is not None and w * h > max_pixels:
        w, h = _scaled(w, h, max_pixels / (w * h), stride)
    if max(w, h) > max_size:
        w, h = _scaled(w, h, max_size / max(w, h), stride)
    return w, h


class BagelResize:
    """Callable on a PIL image or a (…, H, W) tensor; bicubic with antialias, as upstream."""

    def __init__(self, max_size: int, min_size: int, stride: int,
                 max_pixels: int | None = BAGEL_MAX_PIXELS):
        if not 0 < min_size <= max_size or stride < 1:
            raise ValueError(f"need 0 < min_size <= max_size and stride >= 1, got "
                             f"{min_size}, {max_size}, {stride}")
        self.max_size, self.min_size, self.stride, self.max_pixels = max_size, min_size, stride, max_pixels

    def size_of(self, width: int, height: int) -> tuple[int, int]:
        return bagel_size(width, height, self.max_size, self.min_size, self.stride, self.max_pixels)

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> Union[Image.Image, torch.Tensor]:
        if isinstance(img, torch.Tensor):
            height, width = img.shape[-2:]
        else:
            width, height = img.size
        w, h = self.size_of(width, height)
        if (w, h) == (width, height):
            return img
        from torchvision.transforms import InterpolationMode  # on first use: torchvision is slow to import
        from torchvision.transforms import functional as TF
        out = TF.resize(img, [h, w], InterpolationMode.BICUBIC, antialias=True)
        return out if not isinstance(out, torch.Tensor) else out.to(img.dtype)

    def __repr__(self) -> str:
        return f"BagelResize(max={self.max_size}, min={self.min_size}, stride={self.stride})"
