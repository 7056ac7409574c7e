"""Decode one image to RGB with PIL, robustly: every failure becomes an ``ImageError`` with a reason.

Handles EXIF orientation, palette/alpha/CMYK/16-bit/grayscale modes (to 8-bit RGB), the first
frame of animations, and refuses decompression bombs (declared size above PIL's pixel limit)
before decoding any pixel. ``to_rgb_image`` takes anything ``predict`` accepts as one image
(a path, bytes, a binary file, a PIL image of any mode, a uint8 array or tensor) and sends it
through the same conversion as a file on disk, so every form of one image scores the same.

Formats: whatever the installed Pillow reads (AVIF included when it is built with libavif), plus
HEIF/HEIC and JPEG XL when the ``[formats]`` extra (``pillow-heif``, ``pillow-jxl-plugin``) is
installed: its plugins are registered on the first decode in each process (DataLoader workers
included), never imported by ``import aigid``. An image whose format has no decoder here is an
``ImageError`` naming what to install.
"""
from __future__ import annotations

import importlib
import io
import logging
import os
import sys
import warnings
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageOps, features

from aigid.data.sources import SNIFF_BYTES, image_format

log = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes]

_ENCODED = (bytes, bytearray, memoryview)


class ImageError(Exception):
    """An image that cannot be used; ``str(err)`` is the reason recorded for it."""


class InputError(ImageError, ValueError):
    """An item given to ``predict`` that cannot be used: the message names the item (its index
    and path or kind) and the reason; ``index``, ``item`` and ``reason`` hold them apart."""

    def __init__(self, reason: str, index: Optional[int] = None, item: str = "") -> None:
        where = f"item {index}" if index is not None else "input"
        super().__init__(f"{where} ({item}): {reason}" if item else f"{where}: {reason}")
        self.index, self.item, self.reason = index, item, reason

    def __reduce__(self):  # pickles whole (DataLoader workers, Ray), not re-wrapping the message
        return type(self), (self.reason, self.index, self.item)


# --------------------------------------------------------------------------- optional formats

FORMATS_EXTRA = "pip install 'aigid[formats]'"
# format -> (plugin module, its pip name); importing pillow_jxl registers it, pillow_heif needs a call
_PLUGINS = {"heif": ("pillow_heif", "pillow-heif"), "jxl": ("pillow_jxl", "pillow-jxl-plugin")}
_registered: dict[str, bool] = {}  # per process: a forked worker inherits it with the registration


def register_plugins() -> dict[str, bool]:
    """Register the installed optional format plugins with Pillow, once per process; return
    which formats are available (a missing plugin is not an error: its files get a reason)."""
    if not _registered:
        for fmt, (module, _) in _PLUGINS.items():
            try:
                mod = importlib.import_module(module)
                if fmt == "heif":
                    mod.register_heif_opener()
                _registered[fmt] = True
            except Exception as err:  # absent, or present but broken (a missing shared library)
                if not isinstance(err, ImportError):
                    log.warning("aigid: %s is installed but failed to load (%s: %s); %s files "
                                "will be errors", module, type(err).__name__, err, fmt.upper())
                _registered[fmt] = False
    return dict(_registered)


def _unsupported(head: bytes) -> Optional[str]:
    """Why an image Pillow did not identify has no decoder here, when its bytes say which format
    it is; ``None`` when they do not (then it is simply not a recognised image)."""
    fmt = image_format(head)
    if fmt == "avif" and not features.check("avif"):
        import PIL
        return (f"AVIF image, but this Pillow ({PIL.__version__}) was built without AVIF support: "
                "install a Pillow with libavif (the PyPI wheels of Pillow >= 11.3 have it)")
    if fmt in _PLUGINS and not register_plugins()[fmt]:
        name = "HEIF/HEIC" if fmt == "heif" else "JPEG XL"
        return f"{name} image needs the {_PLUGINS[fmt][1]} plugin: {FORMATS_EXTRA}"
    return None


def _head(source: Any) -> bytes:
    """The first bytes of a source, for naming its format in an error; b"" when unavailable."""
    try:
        if isinstance(source, _ENCODED):
            return bytes(source[:SNIFF_BYTES])
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as fh:
                return fh.read(SNIFF_BYTES)
        source.seek(0)  # where Image.open itself starts reading a file object
        return source.read(SNIFF_BYTES)
    except Exception:
        return b""


# --------------------------------------------------------------------------- conversion


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _decoded_to_rgb(img: Image.Image) -> Image.Image:
    """The one conversion every image goes through, from a file or from memory: pixels loaded,
    EXIF orientation applied, mode converted (alpha composited on white)."""
    img.load()
    img = ImageOps.exif_transpose(img) or img
    return _to_rgb(img)


def _reason(err: BaseException) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb refused: {err}"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a recognised image format"
    return f"cannot decode: {err}"  # truncated/corrupt data


_DECODE_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, SyntaxError,
                  ValueError, EOFError)  # OSError covers missing files and unidentified images


def load_rgb(source: Source) -> Image.Image:
    """Open, orient and convert one image to RGB; raise ``ImageError`` with a reason on failure.
    ``source``: a path, encoded bytes, or a binary file object."""
    if isinstance(source, io.TextIOBase):
        raise ImageError("a text-mode file: open it in binary mode ('rb')")
    register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(bytes(source)) if isinstance(source, _ENCODED) else source
            with Image.open(fp) as img:
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                return _decoded_to_rgb(img)
    except _DECODE_ERRORS as err:
        reason = _unsupported(_head(source)) if isinstance(err, Image.UnidentifiedImageError) \
            else None
        raise ImageError(reason or _reason(err)) from None


def _array_to_pil(arr: np.ndarray, layout: str) -> Image.Image:
    """A uint8 (H, W) / (H, W, 1|3|4) array (or uint16 (H, W), as a 16-bit PNG decodes) → the PIL
    image a file with those pixels decodes to."""
    if arr.dtype == np.uint16 and arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr))  # "I;16", as a 16-bit greyscale file
    if arr.dtype != np.uint8:
        raise ImageError(f"{layout} arrays and tensors of dtype {arr.dtype} are not images: give uint8 "
                         "pixels (0–255), or a float torch tensor already preprocessed (3, H, W)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ImageError(f"a {layout} image must be (H, W) or (H, W, 1|3|4), got {tuple(arr.shape)}")


def _is_tensor(item: Any) -> bool:
    torch = sys.modules.get("torch")  # not imported here: a tensor exists only if torch is loaded
    return torch is not None and isinstance(item, torch.Tensor)


def _tensor_to_array(t: Any) -> np.ndarray:
    """A uint8 image tensor, (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4 → (H, W[, C]).
    torch's own layout (C first) wins when both ends could be channels (e.g. (3, 5, 4))."""
    if t.dtype.is_floating_point:
        raise ImageError(f"a float tensor {tuple(t.shape)} is not an image: give uint8 pixels (0–255)")
    arr = t.detach().cpu().numpy()
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
        return arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"a uint8 image tensor must be (C, H, W) or (H, W, C) with C in 1, 3, 4, "
                         f"got {tuple(arr.shape)}")
    return arr


def describe(item: Any) -> str:
    """A short name for one input in messages: its path, or its kind and shape."""
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, _ENCODED):
        return f"{len(item)} bytes"
    if isinstance(item, Image.Image):
        return f"PIL image {item.mode} {item.size[0]}x{item.size[1]}"
    if isinstance(item, np.ndarray):
        return f"numpy array {tuple(item.shape)} {item.dtype}"
    if _is_tensor(item):
        return f"tensor {tuple(item.shape)} {str(item.dtype).removeprefix('torch.')}"
    name = getattr(item, "name", None)
    if hasattr(item, "read"):
        return f"file {name!r}" if isinstance(name, (str, bytes)) else "file object"
    return type(item).__name__


def to_rgb_image(item: Any) -> Image.Image:
    """One image in any form ``predict`` accepts → an RGB PIL image, converted exactly as the same
    pixels in a file on disk would be (``load_rgb``); raise ``ImageError`` with a reason.

    Accepted: a path (str / PathLike), encoded bytes, a binary file object, a PIL image of any
    mode (EXIF orientation applied, alpha composited on white, palettes looked up, 16-bit scaled),
    a numpy array (H, W) or (H, W, 1|3|4) of uint8 (or (H, W) uint16), a uint8 torch tensor
    (C, H, W) / (H, W, C) / (H, W)."""
    if isinstance(item, (str, os.PathLike, *_ENCODED)) or hasattr(item, "read"):
        return load_rgb(item)
    if isinstance(item, Image.Image):
        try:  # a lazily opened image may first decode here
            return _decoded_to_rgb(item)
        except _DECODE_ERRORS as err:
            raise ImageError(_reason(err)) from None
    if isinstance(item, np.ndarray):
        return _to_rgb(_array_to_pil(item, "numpy"))
    if _is_tensor(item):
        return _to_rgb(_array_to_pil(_tensor_to_array(item), "tensor"))
    raise ImageError(f"unsupported input type {type(item).__name__}: give a path, bytes, a binary "
                     "file, a PIL image, a uint8 numpy array or tensor, or preprocessed pixels")
