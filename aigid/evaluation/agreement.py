"""How far a detector at another precision strays from fp32 on a labelled set: the largest
|ΔP(fake)|, the fraction of verdicts that flip at the threshold, and the AUROC difference — what
``aigid.models.precision.CPU_BF16_AUTO`` waits on (flips ≤ 0.5%, |ΔAUROC| ≤ 0.002)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from aigid.evaluation.metrics import is_fake, roc_auc

MAX_FLIPS = 0.005
MAX_D_AUROC = 0.002


def agreement(reference: torch.Tensor, other: torch.Tensor, labels: Sequence[int],
              threshold: float = 0.5) -> dict[str, Any]:
    """Scores of the same items at two precisions (``reference``: fp32) against their labels."""
    ref, oth = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    y = np.asarray(labels)
    if ref.shape != oth.shape or ref.shape != y.shape:
        raise ValueError(f"{ref.shape[0]} reference scores, {oth.shape[0]} others, {y.shape[0]} labels")
    flips = float(np.mean(is_fake(ref, threshold) != is_fake(oth, threshold))) if ref.size else 0.0
    auc_ref, auc_oth = roc_auc(y, ref), roc_auc(y, oth)
    report = {"n": int(ref.size), "max_abs_dp": float(np.max(np.abs(ref - oth))) if ref.size else 0.0,
              "flip_fraction": flips, "auroc_fp32": auc_ref, "auroc": auc_oth,
              "d_auroc": auc_oth - auc_ref}
    report["within_bounds"] = bool(flips <= MAX_FLIPS and abs(report["d_auroc"]) <= MAX_D_AUROC)
    return report
