"""Calibrated P(fake) and a chosen threshold, fitted on labelled held-out scores.

- Temperature scaling (Guo et al. 2017, arXiv 1706.04599, sec. 4.2) divides the logit of P(fake)
  by one T > 0 that minimises the NLL of the labels. For a two-logit softmax, logit(P(fake)) is
  l_fake - l_real, so this is their scaling of the logits; it keeps the ranking (AP, AUROC).
- Isotonic regression (Zadrozny & Elkan 2002) fits the non-decreasing map of least squared error
  by pool-adjacent-violators; between the ends of its steps it interpolates linearly and clips
  outside them, as scikit-learn's ``IsotonicRegression(out_of_bounds="clip")`` predicts (the
  tests compare the two). Ties it creates can change AUROC a little.

The threshold is chosen on the *calibrated* scores under aigid's rule, fake when ``score > t``
(``aigid.evaluation.metrics.is_fake``): ``fpr<=a`` takes the smallest t whose false-positive rate on the
reals is at most a (the most fakes caught at that rate), ``balanced`` the t of the best balanced
accuracy (lowest such t), and with neither the calibrated 0.5. The fit and the threshold live in
the detector's config as ``Calibration.to_dict()``, so ``predict`` returns calibrated scores
(``calibrate_scores``) and ``detector.threshold`` is the chosen t (``stored_threshold``).

The map itself, and how a detector applies it, is :mod:`aigid.models.calibration`; its names are
re-exported here so a fit and what it returns come from one place.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np

from aigid.evaluation.metrics import is_fake
from aigid.models.calibration import (  # noqa: F401
    _EPS,
    DEFAULT_THRESHOLD,
    METHODS,
    Calibration,
    CalibrationMap,
    _logit,
    _sigmoid,
    calibrate_scores,
    save_calibration,
    stored_threshold,
)

log = logging.getLogger("aigid")

ECE_BINS = 15  # Guo et al.'s bin count
_T_BOUNDS = (1e-2, 1e2)


# ---- fitting ---------------------------------------------------------------------------------
def _checked(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)) or s.size and (s.min() < 0 or s.max() > 1):
        raise ValueError("scores must be probabilities in [0, 1] (no NaN)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    y = y.astype(np.int64)
    if not (y == 0).any() or not (y == 1).any():
        raise ValueError("calibration needs reals and fakes in the held-out set; "
                         f"got {int((y == 0).sum())} real, {int((y == 1).sum())} fake")
    return s, y


def fit_temperature(scores: Any, labels: Any) -> float:
    """The T in [0.01, 100] minimising the NLL of ``sigmoid(logit(score) / T)``: bounded Brent
    over log T (deterministic; the NLL is convex in 1/T, so it has one minimum there)."""
    from scipy.optimize import minimize_scalar  # scipy is a core dependency; only this needs it

    s, y = _checked(scores, labels)
    z = _logit(s)

    def nll(log_t: float) -> float:
        a = z * math.exp(-log_t)
        return float(np.mean(np.where(y == 1, np.logaddexp(0.0, -a), np.logaddexp(0.0, a))))

    lo, hi = math.log(_T_BOUNDS[0]), math.log(_T_BOUNDS[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    t = math.exp(res.x)
    if min(res.x - lo, hi - res.x) < 1e-3:
        log.warning("aigid calibrate: temperature %.4g sits at its bound %s; the scores barely "
                    "separate the classes (or rank them backwards)", t, _T_BOUNDS)
    return t


def fit_isotonic(scores: Any, labels: Any) -> tuple[list[float], list[float]]:
    """Knots (x, y) of the non-decreasing least-squares fit of labels on scores (PAV on the
    distinct scores, each weighted by its count); each step is kept as its first and last x."""
    s, y = _checked(scores, labels)
    order = np.argsort(s, kind="stable")
    xs, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    means = np.add.reduceat(y[order].astype(np.float64), first) / counts
    vals: list[float] = []
    wts: list[float] = []
    ends: list[int] = []
    for i, (v, w) in enumerate(zip(means.tolist(), counts.tolist())):
        while vals and vals[-1] >= v:  # pool the previous step into this one until increasing
            pv, pw = vals.pop(), wts.pop()
            ends.pop()
            v, w = (pv * pw + v * w) / (pw + w), pw + w
        vals.append(v)
        wts.append(w)
        ends.append(i)
    kx: list[float] = []
    ky: list[float] = []
    start = 0
    for v, end in zip(vals, ends):
        for j in sorted({start, end}):
            kx.append(float(xs[j]))
            ky.append(float(v))
        start = end + 1
    return kx, ky


def rates(scores: Any, labels: Any, threshold: float) -> tuple[float, float]:
    """(FPR on the reals, TPR on the fakes) with fake when ``score > threshold``."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    fake = is_fake(s, threshold)
    fpr = float(fake[y == 0].mean()) if (y == 0).any() else float("nan")
    tpr = float(fake[y == 1].mean()) if (y == 1).any() else float("nan")
    return fpr, tpr


def fpr_threshold(scores: Any, labels: Any, target_fpr: float) -> float:
    """The smallest t with FPR(t) <= ``target_fpr`` under ``score > t``: the (k+1)-th highest
    real score, k the most reals allowed above it."""
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    reals = np.sort(s[y == 0])[::-1]
    k = int(math.floor(target_fpr * reals.size))
    if (k + 1) / reals.size <= target_fpr:  # floor of a product that rounded just below an integer
        k += 1
    return float(reals[k])


def balanced_threshold(scores: Any, labels: Any) -> float:
    """The t (one of the scores, or just below the lowest) of the best (TPR + TNR) / 2 under
    ``score > t``; the lowest such t."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    reals, fakes = np.sort(s[y == 0]), np.sort(s[y == 1])
    cand = np.r_[np.nextafter(s.min(), -np.inf), np.unique(s)]
    tnr = np.searchsorted(reals, cand, side="right") / reals.size
    tpr = 1 - np.searchsorted(fakes, cand, side="right") / fakes.size
    return float(cand[int(np.argmax(tnr + tpr))])


def fit(scores: Any, labels: Any, method: str = "temperature", target_fpr: Optional[float] = None,
        balanced: bool = False, fitted_on: Optional[dict[str, Any]] = None) -> Calibration:
    """Fit ``method`` on raw P(fake) and labels (0 real, 1 fake), then choose the threshold on
    the calibrated scores: for ``target_fpr``, for ``balanced`` accuracy, or 0.5."""
    if target_fpr is not None and balanced:
        raise ValueError("choose the threshold by a target FPR or by balanced accuracy, not both")
    s, y = _checked(scores, labels)
    if method == "temperature":
        cal = Calibration("temperature", T=fit_temperature(s, y))
    elif method == "isotonic":
        kx, ky = fit_isotonic(s, y)
        cal = Calibration("isotonic", x=kx, y=ky)
    else:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    # The threshold is chosen on what predict will return: calibrated scores rounded to float32.
    p = cal.apply(s).astype(np.float32).astype(np.float64)
    if target_fpr is not None:
        cal.threshold, cal.rule = fpr_threshold(p, y, target_fpr), f"fpr<={target_fpr:g}"
    elif balanced:
        cal.threshold, cal.rule = balanced_threshold(p, y), "balanced"
    else:
        cal.threshold, cal.rule = DEFAULT_THRESHOLD, "p>0.5"
    cal.fitted_on = {"n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()), **(fitted_on or {})}
    return cal


# ---- reliability -----------------------------------------------------------------------------
def reliability_bins(p: Any, labels: Any, bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of P(fake) over [0, 1] (right-closed, the first also holds 0): mean
    score, fraction fake and count; NaN where a bin is empty."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = np.clip(np.ceil(p * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=bins) / count
        frac = np.bincount(idx, weights=y, minlength=bins) / count
    return mean_p, frac, count


def expected_calibration_error(p: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """ECE of P(fake): sum over bins of (count / n)·|fraction fake - mean score| (Guo et al.'s
    binning, on the fake-class probability as a reliability diagram plots it); NaN when empty."""
    mean_p, frac, count = reliability_bins(p, labels, bins)
    if not count.sum():
        return float("nan")
    used = count > 0
    return float(np.sum(count[used] * np.abs(frac[used] - mean_p[used])) / count.sum())


def brier_score(p: Any, labels: Any) -> float:
    """Mean squared error of P(fake) against the 0/1 label; NaN when empty."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")
