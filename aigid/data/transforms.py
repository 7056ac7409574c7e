"""The detector's preprocessing, built from the ``preprocess`` dict its config carries.

Users never resize by hand: ``predict`` applies the same transform that training used for eval
(resize the shortest side + centre crop, or squash), then normalises with the model's mean/std.
``resize_mode="none"`` is crop-only, as UnivFD evaluates (upstream UniversalFakeDetect
``validate.py``: CenterCrop(224), no resize): pixels keep their scale, so no resampling blurs
the generator's high-frequency traces. An image smaller than the crop is zero-padded: what
torchvision's CenterCrop (UnivFD's) does; training uses RandomCrop(pad_if_needed) likewise.
UnivFD's training resized to 256 before its random crop; with ``none`` we crop in training too,
so both see one pixel scale (our assumption).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from aigid.data.bagel_resize import BagelResize
from aigid.data.images import load_rgb

_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
           "nearest": T.InterpolationMode.NEAREST}

Transform = Callable[[Image.Image], torch.Tensor]
ImageInput = Union[torch.Tensor, Image.Image, str, os.PathLike, Sequence]


def _resize(pp: dict[str, Any]) -> list:
    size, mode = int(pp["size"]), pp.get("resize_mode", "shortest")
    interp = _INTERP[pp.get("interpolation", "bicubic")]
    if mode == "bagel":  # aspect kept, no crop: each image keeps its own size (UniGenDet)
        return [BagelResize(int(pp.get("max_size", 1024)), size, int(pp.get("stride", 16)))]
    if mode == "shortest":
        return [T.Resize(size, interpolation=interp, antialias=True)]
    if mode == "squash":
        return [T.Resize((size, size), interpolation=interp, antialias=True)]
    if mode == "none":  # crop-only (UnivFD): the crop that follows gives the size
        return []
    raise ValueError(f"unsupported resize_mode {mode!r} (shortest, squash, none or bagel)")


def _tensor_and_normalise(pp: dict[str, Any]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp["mean"], pp["std"])]


def is_variable_size(pp: dict[str, Any]) -> bool:
    """True when the transform keeps each image's aspect (batches are lists, not one tensor)."""
    return pp.get("resize_mode") == "bagel"


def eval_transform(pp: dict[str, Any]) -> Transform:
    """Deterministic: resize (``none``: no resize), centre crop to ``size``² (zero-padding smaller
    images; ``bagel``: no crop), to float, normalise."""
    crop = [] if is_variable_size(pp) else [T.CenterCrop(int(pp["size"]))]
    return T.Compose(_resize(pp) + crop + _tensor_and_normalise(pp))


def train_transform(pp: dict[str, Any]) -> Transform:
    """Resize, random crop and horizontal flip (no colour jitter: it would erase the artefacts)."""
    size = int(pp["size"])
    return T.Compose(_resize(pp) + [T.RandomCrop(size, pad_if_needed=True), T.RandomHorizontalFlip()]
                     + _tensor_and_normalise(pp))


def to_pixels(images: ImageInput, transform: Transform, device: torch.device) -> torch.Tensor:
    """What a detector's ``predict`` takes → normalised pixels (N, 3, H, W) on ``device``.

    PIL images and paths go through ``transform`` (the detector's own preprocessing); a tensor is
    taken as already preprocessed ((3, H, W) or (N, 3, H, W)). Unreadable files raise ImageError.
    """
    if isinstance(images, torch.Tensor):
        batch = images if images.ndim == 4 else images[None]
    else:
        items = [images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images)
        if not items:
            raise ValueError("no images given")
        batch = torch.stack([transform(im if isinstance(im, Image.Image) else load_rgb(im)) for im in items])
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"pixels must be (N, 3, H, W), got {tuple(batch.shape)}")
    return batch.to(device)
