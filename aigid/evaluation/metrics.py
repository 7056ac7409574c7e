"""Binary detection metrics with the conventions detector frameworks use (fake = positive class).

acc at a threshold (0.5 by default), real and fake accuracy reported separately (a detector
biased to "fake" looks fine on a mixed set), AP, AUROC and EER. Ties in scores are handled as
scikit-learn does (one ROC/PR point per distinct score), without depending on it.

Conventions, so numbers sit beside the frameworks' own:

- a score counts as fake when ``score > threshold``: a score exactly on the threshold is *real*
  (UnivFD ``validate.py`` ``calculate_acc``: ``y_pred > thres``; SIDBench
  ``utils/evaluation_utils.py`` ``calculate_for_threshold``: ``y_pred > threshold``; DeepfakeBench
  ``training/metrics/utils.py`` ``get_test_metrics``: ``y_pred > 0.5``);
- EER is DeepfakeBench's: ``fpr[nanargmin(|fnr - fpr|)]`` on scikit-learn's ``roc_curve``
  (``drop_intermediate=True``), the FPR at the closest point, not the mean of FPR and FNR.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def is_fake(scores, threshold: float):
    """True where a score counts as fake: ``score > threshold`` (see the module doc for sources).

    The one place that sets the comparison: metrics, scan labels and the results store use it."""
    return np.greater(scores, threshold)


def _curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) at each distinct score, from the highest down, and those scores."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp, fp, s[last_of_tie]


def _roc(labels, scores, drop_intermediate: bool = False) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(fpr, tpr) from (0, 0) over each distinct threshold, or None when a class is missing.

    ``drop_intermediate`` removes collinear points as scikit-learn's ``roc_curve`` does by default
    (a point whose neighbours' fp and tp steps are both equal to its own); the area is unchanged,
    but DeepfakeBench's EER is an argmin over the remaining points, so it must see the same ones.
    """
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if pos == 0 or neg == 0:
        return None
    tp, fp, _ = _curve(y, s)
    if drop_intermediate and tp.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fp, 2), np.diff(tp, 2)), True]
        tp, fp = tp[keep], fp[keep]
    return np.r_[0, fp] / neg, np.r_[0, tp] / pos


def roc_auc(labels, scores) -> float:
    roc = _roc(labels, scores)
    return float("nan") if roc is None else float(np.trapezoid(roc[1], roc[0]))


def average_precision(labels, scores) -> float:
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    tp, fp, _ = _curve(y, s)
    precision, recall = tp / (tp + fp), tp / pos
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def equal_error_rate(labels, scores) -> float:
    """DeepfakeBench's EER: the FPR at the ROC point where |FNR - FPR| is smallest (the first such
    point from the top threshold down), NaN when a class is missing."""
    roc = _roc(labels, scores, drop_intermediate=True)
    if roc is None:
        return float("nan")
    fpr, fnr = roc[0], 1 - roc[1]
    return float(fpr[int(np.argmin(np.abs(fnr - fpr)))])


def oracle_accuracy(labels, scores) -> tuple[float, float]:
    """(best accuracy, its threshold) over every threshold, chosen on these very labels.

    UnivFD and SIDBench report this number; it is an *oracle* (not deployable): a real threshold
    must come from a validation split. The threshold follows :func:`is_fake` (``score > t``) and
    is one of the scores (just below the lowest when calling everything fake is best). Their own
    searches can only find as much or less: UnivFD (``find_best_threshold``) picks a score with
    ``>=`` then reports the accuracy at ``> best``; SIDBench (``find_best_acc_threshold``) tries a
    100-point grid over [0, 1].
    """
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        return float("nan"), float("nan")
    neg = int(y.size - y.sum())
    tp, fp, distinct = _curve(y, s)
    correct = tp + (neg - fp)              # fake predicted for scores >= each distinct score
    best = int(np.argmax(correct))
    if neg >= correct[best]:               # calling everything real is at least as good
        return neg / y.size, float(distinct[0])
    # ">= distinct[best]" is "> the next lower distinct score" (or > anything below the lowest)
    below = distinct[best + 1] if best + 1 < distinct.size else np.nextafter(distinct[best], -np.inf)
    return float(correct[best] / y.size), float(below)


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict[str, float]:
    """n, n_real, n_fake; acc, real_acc, fake_acc at ``threshold`` (fake when ``score > threshold``);
    ap, auroc, eer. A metric a missing class makes undefined is NaN."""
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    pred = is_fake(s, threshold).astype(np.int64)

    def acc(mask):
        return float((pred[mask] == y[mask]).mean()) if mask.any() else float("nan")

    return {
        "n": int(y.size), "n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()),
        "acc": acc(np.ones_like(y, dtype=bool)), "real_acc": acc(y == 0), "fake_acc": acc(y == 1),
        "ap": average_precision(y, s), "auroc": roc_auc(y, s), "eer": equal_error_rate(y, s),
    }
