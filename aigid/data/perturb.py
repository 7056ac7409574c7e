"""Image perturbations for robustness sweeps, applied to the decoded RGB image before the
detector's own preprocessing (as SIDBench does): JPEG re-compression and Gaussian blur.

Names: ``clean``, ``jpeg<Q>`` (quality 1-100, e.g. ``jpeg95``) and ``blur<σ>`` (Gaussian blur
with standard deviation σ in pixels, e.g. ``blur2``). ``sidbench`` expands to SIDBench's sweep.

Both follow UnivFD ``validate.py`` and SIDBench ``dataset/dataset.py`` (``png2jpg``,
``gaussian_blur``) pixel for pixel:

- JPEG: Pillow's encoder at that quality with its defaults (4:2:0 chroma subsampling, standard
  tables), decoded back by Pillow;
- blur: ``scipy.ndimage.gaussian_filter`` on each uint8 channel with ``output=`` that channel,
  so scipy's defaults (``mode="reflect"``, ``truncate=4.0``) and its uint8 output -- each 1-D pass
  truncated to an integer -- are part of the result. PIL's ``GaussianBlur`` is a box-filter
  approximation and differs by up to ~15 grey levels.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

SIDBENCH_SWEEP = ("jpeg95", "jpeg90", "jpeg50", "jpeg30", "blur2", "blur4")

_NAME = re.compile(r"^(clean|jpeg(\d{1,3})|blur(\d+(?:\.\d+)?))$")


@dataclass(frozen=True)
class Perturbation:
    """A picklable image -> image function (DataLoader workers receive it)."""

    name: str

    def __post_init__(self):
        m = _NAME.match(self.name)
        if not m:
            raise ValueError(f"unknown perturbation {self.name!r}: use clean, jpeg<quality> or blur<sigma>")
        if m.group(2) is not None and not 1 <= int(m.group(2)) <= 100:
            raise ValueError(f"{self.name!r}: JPEG quality must be in 1..100")

    def __call__(self, img: Image.Image) -> Image.Image:
        m = _NAME.match(self.name)
        if m.group(2) is not None:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=int(m.group(2)))
            buf.seek(0)
            with Image.open(buf) as out:
                return out.convert("RGB")
        if m.group(3) is not None:
            return gaussian_blur(img, float(m.group(3)))
        return img


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """UnivFD's/SIDBench's blur: scipy's Gaussian filter per channel, written back into uint8."""
    from scipy.ndimage import gaussian_filter  # lazy: scipy loads only when a sweep blurs

    arr = np.array(img.convert("RGB"))  # a writable copy, (H, W, 3) uint8
    for c in range(3):
        gaussian_filter(arr[:, :, c], sigma=sigma, output=arr[:, :, c])
    return Image.fromarray(arr)


def parse_sweep(spec: str | Sequence[str]) -> list[Perturbation]:
    """``"sidbench"``, ``"jpeg90,blur2"`` or a list of names -> perturbations (validated)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Perturbation] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        out += [Perturbation(n) for n in SIDBENCH_SWEEP] if name == "sidbench" else [Perturbation(name)]
    return out


def compose(perturb: Callable[[Image.Image], Image.Image], transform: Callable) -> Callable:
    return _Composed(perturb, transform)


@dataclass(frozen=True)
class _Composed:
    perturb: Callable
    transform: Callable

    def __call__(self, img: Image.Image):
        return self.transform(self.perturb(img))
