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

import logging
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image

from aigid.data.bagel_resize import BagelResize
from aigid.data.images import ImageError, InputError, describe, to_rgb_image

log = logging.getLogger(__name__)

_INTERP = ("bicubic", "bilinear", "nearest")


def _v2():
    """torchvision.transforms.v2, imported on first use: importing torchvision pulls in its model
    zoo and torch._dynamo (~1 s), which ``import aigid`` should not pay for."""
    from torchvision.transforms import v2
    return v2

Transform = Callable[[Image.Image], torch.Tensor]
ImageInput = Union[torch.Tensor, np.ndarray, Image.Image, str, os.PathLike, bytes, BinaryIO, Sequence]
_SINGLE = (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)


def _resize(pp: dict[str, Any]) -> list:
    size, mode = int(pp["size"]), pp.get("resize_mode", "shortest")
    T = _v2()
    name = pp.get("interpolation", "bicubic")
    if name not in _INTERP:
        raise ValueError(f"unsupported interpolation {name!r} ({', '.join(_INTERP)})")
    interp = T.InterpolationMode(name)
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
    T = _v2()
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp["mean"], pp["std"])]


def is_variable_size(pp: dict[str, Any]) -> bool:
    """True when the transform keeps each image's aspect (batches are lists, not one tensor)."""
    return pp.get("resize_mode") == "bagel"


def eval_transform(pp: dict[str, Any]) -> Transform:
    """Deterministic: resize (``none``: no resize), centre crop to ``size``² (zero-padding smaller
    images; ``bagel``: no crop), to float, normalise."""
    T = _v2()
    crop = [] if is_variable_size(pp) else [T.CenterCrop(int(pp["size"]))]
    return T.Compose(_resize(pp) + crop + _tensor_and_normalise(pp))


def train_transform(pp: dict[str, Any]) -> Transform:
    """Resize, random crop and horizontal flip (no colour jitter: it would erase the artefacts)."""
    T = _v2()
    size = int(pp["size"])
    return T.Compose(_resize(pp) + [T.RandomCrop(size, pad_if_needed=True), T.RandomHorizontalFlip()]
                     + _tensor_and_normalise(pp))


# ---- what predict takes --------------------------------------------------------------------

Errors = Literal["raise", "skip"]
MAX_ABS_PIXEL = 32.0  # normalised pixels stay within a few units; raw 0–255 values do not


def is_single(images: Any) -> bool:
    """True when ``images`` is one image rather than a batch or a list of them."""
    if isinstance(images, _SINGLE) or hasattr(images, "read"):
        return True
    if isinstance(images, torch.Tensor):
        return images.ndim == 3 if images.is_floating_point() else images.ndim in (2, 3)
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


def check_pixels(x: torch.Tensor, *, batch_ok: bool = True) -> None:
    """Raise ``InputError`` unless float ``x`` looks preprocessed: (3, H, W) (or, with
    ``batch_ok``, (N, 3, H, W)), normalised (no value beyond ``MAX_ABS_PIXEL``)."""
    dims = (3, 4) if batch_ok else (3,)
    if x.ndim not in dims or x.shape[-3] != 3:
        want = "(3, H, W) or (N, 3, H, W)" if batch_ok else "(3, H, W) per item of a list"
        hint = " (channels last?)" if x.ndim in (3, 4) and x.shape[-1] == 3 else ""
        raise InputError(f"a float tensor is taken as pixels already preprocessed by the detector, "
                         f"{want}; got {tuple(x.shape)}{hint}. Give uint8 pixels (C, H, W) / "
                         f"(H, W, C), a PIL image or a path to have them preprocessed")
    peak = x.detach().abs().amax().item() if x.numel() else 0.0
    if peak > MAX_ABS_PIXEL:
        raise InputError(f"a float tensor is taken as preprocessed (normalised) pixels, but its values "
                         f"reach {peak:.4g}: give raw 0–255 pixels as uint8 to have them preprocessed")


@dataclass
class Prepared:
    """The usable items of one ``predict`` call as pixels, and why the others were left out."""

    pixels: Union[torch.Tensor, list[torch.Tensor]]  # usable items in input order; a given batch as is
    kept: list[int]                                  # their indices in the input
    errors: dict[int, str]                           # index → reason, for the items left out
    count: int                                       # items given
    offset: int = 0                                  # index of the first item in the whole input

    def stacked(self, device: Union[str, torch.device]) -> torch.Tensor:
        """One (M, 3, H, W) batch on ``device``; (0, 3, 0, 0) when no item was usable."""
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels.to(device)
        if not self.pixels:
            return torch.empty(0, 3, 0, 0, device=device)
        sizes = sorted({tuple(p.shape) for p in self.pixels})
        if len(sizes) > 1:
            raise InputError(f"preprocessed images of different sizes {sizes} cannot form one batch")
        return torch.stack([p.to(device) for p in self.pixels])

    def scatter(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores of the kept items → one per input item, NaN where an item was left out."""
        if not self.errors:
            return scores
        out = torch.full((self.count,), float("nan"), dtype=scores.dtype)
        out[self.kept] = scores.to(out.device)
        return out


def _items(images: Any) -> list:
    if is_single(images):
        return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 4:  # a batch of images: (N, C, H, W) / (N, H, W, C)
            return list(images)
        raise InputError(f"expected one image or a batch of them, got an array of shape {tuple(images.shape)}")
    try:
        return list(images)
    except TypeError:  # one item of a kind we do not take: its own error names it
        return [images]


def item_pixels(item: Any, transform: Transform) -> torch.Tensor:
    """One item (not a float batch) → its preprocessed pixels; raise ``ImageError`` with a reason."""
    if isinstance(item, torch.Tensor) and item.is_floating_point():
        check_pixels(item, batch_ok=False)
        return item
    return transform(to_rgb_image(item))


def prepare(images: ImageInput, transform: Transform, *, errors: Errors = "raise") -> Prepared:
    """What a detector's ``predict`` takes → per-item pixels (not moved to a device).

    One image or a list of them, each a path, bytes, a binary file object, a PIL image (any mode),
    a uint8 numpy array (H, W[, C]) or a uint8 tensor ((C, H, W) / (H, W, C)), all decoded as the
    same file on disk is (``aigid.data.images.to_rgb_image``) and sent through ``transform``; or a
    uint8 batch (N, ...). A float tensor is taken as already preprocessed: (3, H, W) or
    (N, 3, H, W) (kept as given), or (3, H_i, W_i) items of a list.

    ``errors="raise"`` (default): the first unusable item raises ``InputError`` naming its index,
    its path or kind, and the reason. ``errors="skip"``: it is left out (``Prepared.errors`` holds
    the reason, a warning is logged). A malformed float batch raises in both modes."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        check_pixels(images)
        batch = images if images.ndim == 4 else images[None]
        return Prepared(batch, list(range(len(batch))), {}, len(batch))
    items = _items(images)
    if not items:
        raise ValueError("no images given")
    pixels, kept, failed = [], [], {}
    for i, item in enumerate(items):
        try:
            pixels.append(item_pixels(item, transform))
            kept.append(i)
        except ImageError as err:
            reason = err.reason if isinstance(err, InputError) else str(err)
            if errors == "raise":
                raise InputError(reason, i, describe(item)) from None
            log.warning("aigid: skipped item %d (%s): %s", i, describe(item), reason)
            failed[i] = reason
    return Prepared(pixels, kept, failed, len(items))


def to_pixels(images: ImageInput, transform: Transform, device: Union[str, torch.device],
              errors: Errors = "raise") -> torch.Tensor:
    """What a detector's ``predict`` takes (see ``prepare``) → normalised pixels (N, 3, H, W) on
    ``device``. With ``errors="skip"`` the unusable items are left out of the batch (a warning
    each); ``prepare`` says which."""
    return prepare(images, transform, errors=errors).stacked(device)
