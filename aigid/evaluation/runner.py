"""The evaluation protocol: per-generator and overall acc, real/fake acc, AP, AUROC, EER, the
calibration of P(fake) (ECE, Brier), accuracy at the detector's stored threshold; ``calibrate``
fits that calibration and threshold on a held-out split (``aigid.models.calibration``).

Results carry what is needed to reproduce them (the preprocessing, sample counts, the files
that could not be read and why), since mismatched preprocessing is the first cause of
"cannot reproduce the paper" in detector repositories.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aigid.data.dataset import LabelledImages, collate_skipping_errors
from aigid.data.labelled import LabelledImage, discover
from aigid.data.perturb import Perturbation, compose, parse_sweep
from aigid.data.transforms import eval_transform
from aigid.evaluation import calibration
from aigid.evaluation.metrics import _roc, binary_metrics, is_fake, oracle_accuracy
from aigid.models.precision import precision_of

log = logging.getLogger("aigid")
NO_VERDICT = "no verdict: the generated answer says neither real nor fake"
_KEYS = ("acc", "real_acc", "fake_acc", "ap", "auroc", "eer", "ece", "brier")
_STORED_KEYS = ("stored_acc", "stored_real_acc", "stored_fake_acc")


def score(detector, items: Sequence[LabelledImage], batch_size: int = 64, num_workers: int = 0,
          progress: bool = True, perturbation: Optional[Perturbation] = None,
          calibrated: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """P(fake) for every readable item; returns (scores, kept indices, errors).

    ``perturbation`` (JPEG, blur) is applied to the decoded image before the detector's transform.
    ``calibrated=False`` asks ``predict`` for raw scores (what ``calibrate`` fits on).
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
            s = (detector.predict(batch["pixels"]) if calibrated
                 else detector.predict(batch["pixels"], calibrated=False)).numpy()
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


def _accuracies(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(acc, real_acc, fake_acc) with fake when ``score > threshold``; NaN for a missing class."""
    # float64 first: numpy 2 compares float32 scores with a Python float in float32, which can
    # round a threshold just below a score (the oracle's) up onto it.
    right = is_fake(np.asarray(scores, dtype=np.float64), threshold) == (labels == 1)
    return tuple(float(right[m].mean()) if m.any() else float("nan")
                 for m in (np.ones_like(right), labels == 0, labels == 1))


def _with_oracle(labels: np.ndarray, scores: np.ndarray, threshold: float,
                 stored: Optional[float] = None) -> dict[str, Any]:
    """binary_metrics, ECE and Brier score, the oracle accuracy (best threshold on these labels)
    split by class as SIDBench's ``acc_oracle.txt`` reports it, and with ``stored`` (the
    detector's calibrated threshold) the accuracies at it."""
    m = binary_metrics(labels, scores, threshold)
    m.update(ece=calibration.expected_calibration_error(scores, labels),
             brier=calibration.brier_score(scores, labels))
    if labels.size:
        acc, at = oracle_accuracy(labels, scores)
        _, real_acc, fake_acc = _accuracies(labels, scores, at)
        m.update(oracle_acc=acc, oracle_threshold=at, oracle_real_acc=real_acc, oracle_fake_acc=fake_acc)
    if stored is not None:
        m.update(stored_threshold=stored, **dict(zip(_STORED_KEYS, _accuracies(labels, scores, stored))))
    return _clean(m)


def _metrics(items, scores, kept, threshold: float, stored: Optional[float] = None) -> dict[str, Any]:
    labels = np.array([items[i].label for i in kept], dtype=np.int64)
    gens = np.array([items[i].generator or "all" for i in kept])
    per_gen = {g: _with_oracle(labels[gens == g], scores[gens == g], threshold, stored)
               for g in sorted(set(gens.tolist()))}
    keys = _KEYS + (_STORED_KEYS if stored is not None else ())
    mean = {k: (float(np.mean([m[k] for m in per_gen.values() if m[k] is not None]))
                if any(m[k] is not None for m in per_gen.values()) else None) for k in keys}
    overall = _with_oracle(labels, scores, threshold, stored) if kept.size else {"n": 0}
    return {"overall": overall, "per_generator": per_gen, "mean_over_generators": mean}


def _applied_calibration(detector) -> Optional[dict[str, Any]]:
    """The calibration ``predict`` applies: a stored one, unless UniGenDet answers in text."""
    cal = getattr(detector.config, "calibration", None)
    return cal if cal and getattr(detector.config, "verdict", "head") == "head" else None


def evaluate(detector, data: Union[str, Sequence[LabelledImage]], split: Optional[str] = None,
             batch_size: int = 64, num_workers: int = 0, threshold: float = 0.5,
             progress: bool = True, robustness: Union[str, Sequence[str]] = (),
             plots_dir: Optional[str] = None) -> dict[str, Any]:
    """Score a labelled dataset (folder, manifest or items) and compute the metrics.

    Returns ``{"overall": {...}, "per_generator": {gen: {...}}, "mean_over_generators": {...},
    "errors": [...], "protocol": {...}}``; NaN metrics (e.g. AUROC with one class) become None.
    A score counts as fake when ``score > threshold`` (UnivFD's, SIDBench's and DeepfakeBench's
    rule; see ``aigid.evaluation.metrics``); EER is DeepfakeBench's. ``oracle_acc`` (with its
    ``oracle_threshold`` and per-class ``oracle_real_acc``/``oracle_fake_acc``), overall and per
    generator, is the accuracy at the best threshold chosen *on these labels* (the number
    UnivFD/SIDBench print): an oracle, not a deployable figure.

    The scores are ``predict``'s: calibrated when the detector stores a calibration. ``ece``
    (15 equal-width bins of P(fake)) and ``brier`` say how well P(fake) matches the frequency of
    fakes; ``stored_acc``/``stored_real_acc``/``stored_fake_acc`` are the accuracies at
    ``stored_threshold``, ``detector.threshold`` (the one ``calibrate`` chose, else 0.5).

    ``robustness`` ("sidbench", "jpeg90,blur2", or a list) re-scores the same images under each
    perturbation and adds ``{"robustness": {name: {"overall", "per_generator",
    "mean_over_generators"}}}``, at both thresholds. ``aigid.evaluation.formats.write_report`` writes
    the result in UnivFD's, SIDBench's or DeepfakeBench's files. ``plots_dir``: write
    ``roc.png`` and ``reliability.png`` there (overall; needs matplotlib, the ``plots`` extra).
    """
    sweep = parse_sweep(robustness)  # validate names before any scoring
    items = discover(data, split) if isinstance(data, str) else list(data)
    if not items:
        raise ValueError(f"no labelled images found in {data!r}")
    stored = float(getattr(detector, "threshold", calibration.DEFAULT_THRESHOLD))
    applied = _applied_calibration(detector)
    scores, kept, errors = score(detector, items, batch_size, num_workers, progress)
    result = _metrics(items, scores, kept, threshold, stored)
    result["errors"] = errors
    result["protocol"] = {
        "threshold": threshold, "fake_if": "score > threshold",
        "stored_threshold": stored, "stored_rule": (applied or {}).get("rule"),
        "calibration": (applied or {}).get("method"), "ece_bins": calibration.ECE_BINS,
        "preprocess": detector.config.preprocess,
        "verdict": getattr(detector.config, "verdict", "head"),
        "precision": precision_of(detector),  # scores differ slightly between them
        "n_listed": len(items), "n_scored": int(kept.size), "n_errors": len(errors),
        "split": split, "data": data if isinstance(data, str) else None,
        "oracle_acc": "threshold chosen on the evaluated labels; not deployable",
    }
    if sweep:
        result["protocol"]["robustness"] = [p.name for p in sweep]
        result["robustness"] = {}
        for p in sweep:
            m = _metrics(items, *score(detector, items, batch_size, num_workers, progress, p)[:2],
                         threshold, stored)
            result["robustness"][p.name] = {k: m[k] for k in ("overall", "per_generator",
                                                               "mean_over_generators")}
    if plots_dir is not None:
        labels = np.array([items[i].label for i in kept], dtype=np.int64)
        result["plots"] = write_plots(plots_dir, labels, scores, stored)
    return result


def write_plots(directory: str, labels: np.ndarray, scores: np.ndarray,
                stored: float = calibration.DEFAULT_THRESHOLD) -> list[str]:
    """``roc.png`` (the stored threshold marked) and ``reliability.png`` (fraction fake per bin of
    P(fake) against the diagonal) in ``directory``; the paths written. Without matplotlib, or
    without both classes for the ROC, a notice and fewer (or no) files."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        log.warning("aigid eval: matplotlib is not installed; no plots written "
                    "(pip install 'aigid[plots]')")
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    roc = _roc(labels, scores)
    if roc is None:
        log.warning("aigid eval: no ROC curve: the scored images are all of one class")
    else:
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        ax.plot(roc[0], roc[1], label="ROC")
        fpr, tpr = calibration.rates(scores, labels, stored)
        ax.plot([fpr], [tpr], "o", label=f"stored threshold {stored:.3g}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false-positive rate (reals called fake)", ylabel="true-positive rate",
               xlim=(0, 1), ylim=(0, 1.01), title="ROC")
        ax.legend(loc="lower right")
        written.append(os.path.join(directory, "roc.png"))
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    mean_p, frac, count = calibration.reliability_bins(scores, labels)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    used = count > 0
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    ax.plot(mean_p[used], frac[used], "o-", label="detector")
    ece = calibration.expected_calibration_error(scores, labels)
    ax.set(xlabel="mean P(fake) in bin", ylabel="fraction fake in bin", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {ece:.3f}, {calibration.ECE_BINS} bins)")
    ax.legend(loc="upper left")
    written.append(os.path.join(directory, "reliability.png"))
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    return written


def calibrate(detector, data: Union[str, Sequence[LabelledImage]], split: Optional[str] = "val",
              method: str = "temperature", target_fpr: Optional[float] = None, balanced: bool = False,
              batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fit ``method`` ("temperature" or "isotonic") on the raw scores of a labelled held-out set
    and choose the threshold (for ``target_fpr`` on the reals, for ``balanced`` accuracy, or
    0.5); store both in ``detector.config.calibration`` (``save_pretrained`` or
    ``aigid.models.calibration.save_calibration`` keeps them). Returns the report: ECE and Brier before
    and after, the threshold with its rule, its FPR and TPR on this set, the skipped files.

    UniGenDet: only the head's P(fake) is calibrated; a detector set to answer in text refuses.
    """
    if getattr(detector.config, "verdict", "head") != "head":
        raise ValueError("calibration applies to the detection head's P(fake); this detector "
                         "gives text verdicts (set verdict='head')")
    items = discover(data, split) if isinstance(data, str) else list(data)
    if not items:
        raise ValueError(f"no labelled images found in {data!r}" + (f" (split {split!r})" if split else ""))
    raw, kept, errors = score(detector, items, batch_size, num_workers, progress, calibrated=False)
    labels = np.array([items[i].label for i in kept], dtype=np.int64)
    source = {"data": data if isinstance(data, str) else None, "split": split}
    cal = calibration.fit(raw, labels, method, target_fpr, balanced, fitted_on=source)
    p = cal.apply(raw).astype(np.float32)  # as predict will return them
    fpr, tpr = calibration.rates(p, labels, cal.threshold)
    detector.config.calibration = cal.to_dict()

    def quality(s):
        return {"ece": calibration.expected_calibration_error(s, labels),
                "brier": calibration.brier_score(s, labels)}

    return {"calibration": cal.to_dict(), "method": cal.method, "threshold": cal.threshold,
            "rule": cal.rule, "fpr": fpr, "tpr": tpr, "n": int(labels.size),
            "n_real": int((labels == 0).sum()), "n_fake": int((labels == 1).sum()),
            "before": quality(raw), "after": quality(p), "errors": errors, **source}


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
