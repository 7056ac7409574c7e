"""How far a detector at another precision strays from fp32 on a labelled set: the largest
|ΔP(fake)|, the fraction of verdicts that flip at the threshold, and the AUROC difference
(``agreement``); ``measure`` does it for a detector's precisions and makes the record ``auto``
rests on (``precision.json``, :mod:`aigid.models.precision_record`: flips ≤ 0.5%,
|ΔAUROC| ≤ 0.002, ≥ 200 images)."""
from __future__ import annotations

import copy
import datetime
from typing import Any, Sequence, Union

import numpy as np
import torch

from aigid.data.labelled import LabelledImage, discover
from aigid.evaluation.metrics import is_fake, roc_auc
from aigid.evaluation.runner import score
from aigid.models.identity import model_id
from aigid.models.precision import BF16_CPU_FLAGS, cpu_flags, cpu_model, set_precision
from aigid.models.precision_record import MAX_D_AUROC, MAX_FLIPS, MIN_IMAGES, within_bounds
from aigid.version import __version__

__all__ = ["agreement", "measure", "MAX_FLIPS", "MAX_D_AUROC", "MIN_IMAGES"]


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
    report["within_bounds"] = within_bounds(report)
    return report


def measure(detector, data: Union[str, Sequence[LabelledImage]], split: str | None = None,
            precisions: Sequence[str] = ("bf16",), batch_size: int = 32, num_workers: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Score the labelled images of ``data`` with ``detector`` (fp32, on a CPU) and with a copy of
    it at each of ``precisions``; the record ``write_record`` stores. Items unreadable at any
    precision are left out of all (the same images are compared)."""
    if getattr(detector, "weights_recast", False) or getattr(detector, "precision", "fp32") not in (None, "fp32"):
        raise ValueError(f"measure agreement against an fp32 detector (this one is at {detector.precision})")
    if detector.device.type != "cpu":
        raise ValueError("agreement is measured where bf16/int8 weights run: on a CPU")
    items = discover(data, split) if isinstance(data, str) else list(data)
    if not items:
        raise ValueError(f"no labelled images found in {data!r}" + (f" (split {split!r})" if split else ""))
    threshold = float(detector.threshold)
    runs = {"fp32": score(detector, items, batch_size, num_workers, progress)}
    for precision in precisions:
        twin = copy.deepcopy(detector)  # the same weights; the original stays fp32
        set_precision(twin, precision)
        runs[precision] = score(twin, items, batch_size, num_workers, progress)
        del twin
    kept = set.intersection(*(set(kept.tolist()) for _, kept, _ in runs.values()))
    order = sorted(kept)

    def scores_of(name: str) -> np.ndarray:
        scores, kept_idx, _ = runs[name]
        at = {int(i): s for i, s in zip(kept_idx, scores)}
        return np.array([at[i] for i in order], dtype=np.float64)

    labels = np.array([items[i].label for i in order])
    reference = scores_of("fp32")
    return {"model_id": model_id(detector), "threshold": threshold,
            "data": data if isinstance(data, str) else None, "split": split,
            "images": len(items), "compared": len(order),
            "measured_on": {"cpu": cpu_model(), "cpu_bf16_flags": [f for f in BF16_CPU_FLAGS if f in cpu_flags()],
                            "torch": torch.__version__, "aigid": __version__,
                            "date": datetime.date.today().isoformat()},
            "precisions": {p: agreement(reference, scores_of(p), labels, threshold) for p in precisions}}
