"""Binary detection metrics with the conventions detector papers use (fake = positive class).

acc at a threshold (0.5 by default), real and fake accuracy reported separately (a detector
biased to "fake" looks fine on a mixed set), AP, AUROC and EER. Ties in scores are handled
as scikit-learn does (one ROC/PR point per distinct score).
"""
from __future__ import annotations

import numpy as np


def _curve(labels: np.ndarray, scores: np.ndarray):
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp, fp


def _roc(labels, scores):
    """(fpr, tpr) from (0, 0) over each distinct threshold, or None when a class is missing."""
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if pos == 0 or neg == 0:
        return None
    tp, fp = _curve(y, s)
    return np.r_[0, fp] / neg, np.r_[0, tp] / pos


def roc_auc(labels, scores) -> float:
    roc = _roc(labels, scores)
    return float("nan") if roc is None else float(np.trapezoid(roc[1], roc[0]))


def average_precision(labels, scores) -> float:
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    tp, fp = _curve(y, s)
    precision, recall = tp / (tp + fp), tp / pos
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def equal_error_rate(labels, scores) -> float:
    roc = _roc(labels, scores)
    if roc is None:
        return float("nan")
    fpr, fnr = roc[0], 1 - roc[1]
    i = int(np.argmin(np.abs(fpr - fnr)))
    return float((fpr[i] + fnr[i]) / 2)


def oracle_accuracy(labels, scores) -> tuple[float, float]:
    """(best accuracy, its threshold) over every threshold, chosen on these very labels.

    UnivFD and SIDBench report this number; it is an *oracle* (not deployable): a real threshold
    must come from a validation split. Predicts fake when score >= threshold.
    """
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        return float("nan"), float("nan")
    neg = int(y.size - y.sum())
    tp, fp = _curve(y, s)
    correct = tp + (neg - fp)                    # fake predicted for scores >= each distinct score
    thresholds = np.sort(np.unique(s))[::-1]
    best = int(np.argmax(correct))
    if neg >= correct[best]:                     # calling everything real is at least as good
        return neg / y.size, float(np.nextafter(s.max(), np.inf))
    return float(correct[best] / y.size), float(thresholds[best])


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict[str, float]:
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    pred = (s >= threshold).astype(np.int64)

    def acc(mask):
        return float((pred[mask] == y[mask]).mean()) if mask.any() else float("nan")

    return {
        "n": int(y.size), "n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()),
        "acc": acc(np.ones_like(y, dtype=bool)), "real_acc": acc(y == 0), "fake_acc": acc(y == 1),
        "ap": average_precision(y, s), "auroc": roc_auc(y, s), "eer": equal_error_rate(y, s),
    }
