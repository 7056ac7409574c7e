"""The one batch function every server shares: decode an image the way ``predict`` and the scan
do (``load_rgb`` + the detector's own transform), and score decoded images together through the
detector's ``score_prepared`` (MiraGe stacks them; UniGenDet packs images of different sizes)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from aigid.data.transforms import Prepared, item_pixels


def decode(detector: Any, image: Any) -> torch.Tensor:
    """One image in any form ``predict`` takes → the detector's pixels; ``ImageError`` when unusable."""
    return item_pixels(image, detector.transform)


def score_batch(detector: Any, pixels: Sequence[torch.Tensor]) -> list[float]:
    """P(fake) of each decoded image, in order, calibrated as ``predict`` returns it."""
    n = len(pixels)
    return detector.score_prepared(Prepared(list(pixels), list(range(n)), {}, n)).tolist()
