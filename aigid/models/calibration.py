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
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("aigid")

METHODS = ("temperature", "isotonic")
DEFAULT_THRESHOLD = 0.5
ECE_BINS = 15  # Guo et al.'s bin count
# float32 P(fake) reaches 1.0 at a logit of ~16.6: clip so its logit stays finite.
_EPS = 1e-7
_T_BOUNDS = (1e-2, 1e2)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN (a skipped image) stays NaN, quietly
        return np.exp(-np.logaddexp(0.0, -x))  # exact at both ends, where 1 / (1 + e^-x) is not


@dataclass
class Calibration:
    """A fitted map from raw to calibrated P(fake), and the threshold chosen on its output.

    ``T`` for ``method="temperature"``; ``x`` (raw scores) and ``y`` (their calibrated values)
    for ``"isotonic"``. ``fitted_on``: where it came from (counts, data), for the record."""

    method: str
    T: Optional[float] = None
    x: Optional[list[float]] = None
    y: Optional[list[float]] = None
    threshold: Optional[float] = None
    rule: Optional[str] = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if self.method == "temperature" and not (self.T is not None and self.T > 0):
            raise ValueError(f"temperature calibration needs T > 0, got {self.T!r}")
        if self.method == "isotonic" and (not self.x or self.y is None or len(self.x) != len(self.y)):
            raise ValueError("isotonic calibration needs knots x and y of the same, non-zero length")

    def apply(self, p: Any) -> np.ndarray:
        """Calibrated P(fake) (float64) for raw P(fake) ``p``; NaN stays NaN."""
        p = np.asarray(p, dtype=np.float64)
        if self.method == "temperature":
            return _sigmoid(_logit(p) / self.T)
        # np.interp maps NaN to y[0] when there is a single knot: keep a skipped image's NaN
        return np.where(np.isnan(p), np.nan, np.interp(p, self.x, self.y))

    def apply_torch(self, p: torch.Tensor) -> torch.Tensor:
        """``apply`` in torch ops, for graphs that must carry the map (``aigid.export.onnx``,
        ``aigid.export.hf``): calibrated P(fake) in ``p``'s dtype and device; NaN stays NaN. It computes
        in float64 as ``apply`` does (float32 on MPS, which has no float64), so a float32 ``p``
        gives ``apply``'s result rounded to float32, as ``predict`` returns it. See
        ``CalibrationMap``."""
        return CalibrationMap(self).to(p.device)(p)

    def describe(self) -> str:
        """One line naming the map, e.g. ``temperature scaling (T = 1.83)`` or ``isotonic
        regression (12 knots on raw P(fake) 0.031..0.97)``, for logs and model cards."""
        if self.method == "temperature":
            return f"temperature scaling (T = {self.T:.4g})"
        return (f"isotonic regression ({len(self.x)} knots on raw P(fake) "
                f"{min(self.x):.4g}..{max(self.x):.4g}, clipped outside)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the unset fields of the other method are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Calibration":
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown calibration fields {sorted(unknown)}")
        return cls(**raw)


class CalibrationMap(torch.nn.Module):
    """``Calibration.apply`` as a module of export-friendly torch ops (``torch.export`` and the
    ONNX exporter both take it): raw P(fake) (any shape) → calibrated P(fake), same dtype.

    - temperature: ``sigmoid(logit(clip(p, _EPS, 1 - _EPS)) / T)``, ``T`` a constant;
    - isotonic: ``np.interp(p, x, y)``: linear between the knots (stored as buffers, so the
      exporters keep them as constants), ``y[0]`` below ``x[0]``, ``y[-1]`` from ``x[-1]`` on
      (scikit-learn's ``out_of_bounds="clip"``). The segment is found by broadcasting ``p >= x``
      over the knots (an (N, K) comparison; no ``searchsorted``/``bucketize``) and taken as
      numpy does: the last knot at or below ``p``, so repeated knots behave as in ``np.interp``.

    Computes in float64 (float32 on MPS); NaN stays NaN (also with a single knot)."""

    def __init__(self, calibration: "Calibration"):
        super().__init__()
        self.method = calibration.method
        self.T = float(calibration.T) if calibration.method == "temperature" else None
        if calibration.method == "isotonic":
            self.register_buffer("x", torch.tensor(calibration.x, dtype=torch.float64))
            self.register_buffer("y", torch.tensor(calibration.y, dtype=torch.float64))

    def _work_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if p.device.type == "mps" else torch.float64

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        q = p.to(self._work_dtype(p))
        if self.method == "temperature":
            q = q.clamp(_EPS, 1 - _EPS)
            out = torch.sigmoid((torch.log(q) - torch.log1p(-q)) / self.T)
        else:
            out = self._interp(q)
        return out.to(p.dtype)

    def _interp(self, q: torch.Tensor) -> torch.Tensor:
        x, y = self.x.to(q.dtype), self.y.to(q.dtype)
        k = x.shape[0]
        if k == 1:  # one knot (all held-out scores equal): y[0] everywhere but NaN
            return torch.where(torch.isnan(q), q, torch.zeros_like(q) + y[0])
        # j: the last knot with x[j] <= q (-1 below them all), as np.interp's search
        j = (q.unsqueeze(-1) >= x).to(torch.int64).sum(-1) - 1
        j = j.clamp(0, k - 2)
        x0, x1, y0, y1 = x[j], x[j + 1], y[j], y[j + 1]
        width = torch.where(x1 > x0, x1 - x0, torch.ones_like(x0))  # 0/0 only where not used
        inside = (y1 - y0) / width * (q - x0) + y0
        inside = torch.where(q == x0, y0, inside)
        out = torch.where(q < x[0], y[0].expand_as(q), torch.where(q >= x[-1], y[-1].expand_as(q), inside))
        return torch.where(torch.isnan(q), q, out)


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
    from aigid.evaluation.metrics import is_fake

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


# ---- what the detectors call ---------------------------------------------------------------
def calibrate_scores(config: Any, p: torch.Tensor) -> torch.Tensor:
    """``p`` through the config's stored calibration (unchanged when there is none); float32."""
    stored = getattr(config, "calibration", None)
    if not stored:
        return p
    out = Calibration.from_dict(stored).apply(p.detach().cpu().double().numpy())
    return torch.from_numpy(out).to(torch.float32)


def stored_threshold(config: Any) -> float:
    """The threshold stored with the config's calibration, else 0.5. ``config``: a detector
    config, or its config.json as a dict (e.g. a Ray scan reading the folder)."""
    stored = (config.get("calibration") if isinstance(config, dict)
              else getattr(config, "calibration", None)) or {}
    t = stored.get("threshold")
    return DEFAULT_THRESHOLD if t is None else float(t)


def save_calibration(directory: str, calibration: dict[str, Any]) -> str:
    """Store ``calibration`` in the ``config.json`` of a folder written by ``save_pretrained``,
    leaving every other file as it is. The new file is written beside the old and renamed over
    it, so a crash leaves the old config whole. Returns the config's path."""
    import json
    import os
    import tempfile

    from aigid.models.checkpoint import apply_umask

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no config.json: not a folder written by save_pretrained")
    Calibration.from_dict(calibration)  # never store what predict could not apply
    with open(path) as f:
        raw = json.load(f)
    raw["calibration"] = calibration
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(raw, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
