"""The evaluation protocol: per-generator and overall acc, real/fake acc, AP, AUROC, EER.

Results carry what is needed to reproduce them (the preprocessing, sample counts, the files
that could not be read and why), since mismatched preprocessing is the first cause of
"cannot reproduce the paper" in detector repositories.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aigid.data.dataset import LabelledImages, collate_skipping_errors
from aigid.data.labelled import LabelledImage, discover
from aigid.data.perturb import Perturbation, compose, parse_sweep
from aigid.data.transforms import eval_transform
from aigid.metrics import binary_metrics, oracle_accuracy

NO_VERDICT = "no verdict: the generated answer says neither real nor fake"
_KEYS = ("acc", "real_acc", "fake_acc", "ap", "auroc", "eer")


def score(detector, items: Sequence[LabelledImage], batch_size: int = 64, num_workers: int = 0,
          progress: bool = True, perturbation: Optional[Perturbation] = None,
          ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """P(fake) for every readable item; returns (scores, kept indices, errors).

    ``perturbation`` (JPEG, blur) is applied to the decoded image before the detector's transform.
    """
    transform = eval_transform(detector.config.preprocess)
    if perturbation is not None:
        transform = compose(perturbation, transform)
    loader = DataLoader(LabelledImages(items, transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_skipping_errors)
    scores, kept, errors = [], [], []
    desc = "eval" if perturbation is None else f"eval[{perturbation.name}]"
    check_ready = getattr(detector, "check_ready", None)
    if check_ready is not None:  # e.g. a UniGenDet base without its detection head
        check_ready()
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        errors += [{"path": items[i].path, "error": e} for i, e in batch["errors"]]
        if batch["pixels"] is not None:
            s = detector.predict(batch["pixels"]).numpy()
            idx = batch["indices"].numpy()
            # NaN: a text verdict naming neither class; left out of the metrics and reported, as
            # the public evaluation script leaves it out of its accuracy.
            errors += [{"path": items[i].path, "error": NO_VERDICT} for i in idx[np.isnan(s)]]
            scores.append(s[~np.isnan(s)])
            kept.append(idx[~np.isnan(s)])
    if not scores:
        return np.zeros(0), np.zeros(0, dtype=np.int64), errors
    return np.concatenate(scores), np.concatenate(kept), errors


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _with_oracle(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """binary_metrics plus the oracle accuracy (best threshold on these labels), split by class
    as SIDBench's ``acc_oracle.txt`` reports it."""
    m = binary_metrics(labels, scores, threshold)
    if labels.size:
        acc, at = oracle_accuracy(labels, scores)
        at_oracle = binary_metrics(labels, scores, at)
        m.update(oracle_acc=acc, oracle_threshold=at, oracle_real_acc=at_oracle["real_acc"],
                 oracle_fake_acc=at_oracle["fake_acc"])
    return _clean(m)


def _metrics(items, scores, kept, threshold: float) -> dict[str, Any]:
    labels = np.array([items[i].label for i in kept], dtype=np.int64)
    gens = np.array([items[i].generator or "all" for i in kept])
    per_gen = {g: _with_oracle(labels[gens == g], scores[gens == g], threshold)
               for g in sorted(set(gens.tolist()))}
    mean = {k: (float(np.mean([m[k] for m in per_gen.values() if m[k] is not None]))
                if any(m[k] is not None for m in per_gen.values()) else None) for k in _KEYS}
    overall = _with_oracle(labels, scores, threshold) if kept.size else {"n": 0}
    return {"overall": overall, "per_generator": per_gen, "mean_over_generators": mean}


def evaluate(detector, data: Union[str, Sequence[LabelledImage]], split: Optional[str] = None,
             batch_size: int = 64, num_workers: int = 0, threshold: float = 0.5,
             progress: bool = True, robustness: Union[str, Sequence[str]] = ()) -> dict[str, Any]:
    """Score a labelled dataset (folder, manifest or items) and compute the metrics.

    Returns ``{"overall": {...}, "per_generator": {gen: {...}}, "mean_over_generators": {...},
    "errors": [...], "protocol": {...}}``; NaN metrics (e.g. AUROC with one class) become None.
    A score counts as fake when ``score > threshold`` (UnivFD's, SIDBench's and DeepfakeBench's
    rule; see ``aigid.metrics``); EER is DeepfakeBench's. ``oracle_acc`` (with its
    ``oracle_threshold`` and per-class ``oracle_real_acc``/``oracle_fake_acc``), overall and per
    generator, is the accuracy at the best threshold chosen *on these labels* (the number
    UnivFD/SIDBench print): an oracle, not a deployable figure.

    ``robustness`` ("sidbench", "jpeg90,blur2", or a list) re-scores the same images under each
    perturbation and adds ``{"robustness": {name: {"overall", "per_generator",
    "mean_over_generators"}}}``. ``aigid.eval_formats.write_report`` writes the result in
    UnivFD's, SIDBench's or DeepfakeBench's files.
    """
    sweep = parse_sweep(robustness)  # validate names before any scoring
    items = discover(data, split) if isinstance(data, str) else list(data)
    if not items:
        raise ValueError(f"no labelled images found in {data!r}")
    scores, kept, errors = score(detector, items, batch_size, num_workers, progress)
    result = _metrics(items, scores, kept, threshold)
    result["errors"] = errors
    result["protocol"] = {
        "threshold": threshold, "fake_if": "score > threshold",
        "preprocess": detector.config.preprocess,
        "verdict": getattr(detector.config, "verdict", "head"),
        "n_listed": len(items), "n_scored": int(kept.size), "n_errors": len(errors),
        "split": split, "data": data if isinstance(data, str) else None,
        "oracle_acc": "threshold chosen on the evaluated labels; not deployable",
    }
    if sweep:
        result["protocol"]["robustness"] = [p.name for p in sweep]
        result["robustness"] = {}
        for p in sweep:
            m = _metrics(items, *score(detector, items, batch_size, num_workers, progress, p)[:2],
                         threshold)
            result["robustness"][p.name] = {k: m[k] for k in ("overall", "per_generator",
                                                               "mean_over_generators")}
    return result


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
