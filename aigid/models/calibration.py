"""A detector's stored calibration, applied: ``Calibration`` (the fitted map and threshold, as the
config stores it), ``CalibrationMap`` (the same map as a module, for exported graphs) and what the
detectors call (``calibrate_scores``, ``stored_threshold``, ``save_calibration``). The fitting is
in :mod:`aigid.evaluation.calibration`, which needs held-out labels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch


METHODS = ("temperature", "isotonic")
DEFAULT_THRESHOLD = 0.5
# float32 P(fake) reaches 1.0 at a logit of ~16.6: clip so its logit stays finite.
_EPS = 1e-7


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

    from aigid.models.checkpoint import write_text_atomically

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no config.json: not a folder written by save_pretrained")
    Calibration.from_dict(calibration)  # never store what predict could not apply
    with open(path) as f:
        raw = json.load(f)
    raw["calibration"] = calibration
    write_text_atomically(path, json.dumps(raw, indent=2))
    return path
