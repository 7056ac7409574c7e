"""A detector's measured agreement between precisions, kept beside its weights: ``precision.json``.

``auto`` may pick bf16 on a CPU only for a detector shown to agree with fp32 on labelled images:
verdicts flipping at its threshold ≤ 0.5% and |ΔAUROC| ≤ 0.002, on at least 200 images (fewer
cannot show 0.5%: one flip is already 1/n). ``aigid agreement DETECTOR DATA`` measures it
(:mod:`aigid.evaluation.agreement`) and writes the record here; the record names the weights it was
measured on (``model_id``: config, calibration and every tensor), so retraining or recalibrating a
detector leaves a stale record that ``auto`` ignores. The file is not part of the detector's
identity: a scan fingerprint hashes ``config.json`` and the weights only.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional, Union

from aigid.models.checkpoint import write_text_atomically

log = logging.getLogger(__name__)

RECORD_FILE = "precision.json"
RECORD_FORMAT = 1
MAX_FLIPS = 0.005
MAX_D_AUROC = 0.002
MIN_IMAGES = 200
NOT_MEASURED = (False, "bf16's agreement with fp32 is not measured for this detector (aigid agreement DETECTOR DATA)")


def within_bounds(report: Mapping[str, Any]) -> bool:
    """Whether one precision's agreement report (``aigid.evaluation.agreement.agreement``) is
    within ``auto``'s bounds."""
    return (report.get("n", 0) >= MIN_IMAGES and report["flip_fraction"] <= MAX_FLIPS
            and abs(report["d_auroc"]) <= MAX_D_AUROC)


def read_record(folder: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The record in a detector folder, or ``None`` (no file, or one this version cannot read:
    ``auto`` then treats the agreement as unmeasured rather than failing a load)."""
    return _read(os.path.join(os.fspath(folder), RECORD_FILE))


def _read(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not _well_formed(record):
        log.warning("%s: not a precision record this version reads; auto treats bf16 as unmeasured", path)
        return None
    return record


def _well_formed(record: Mapping[str, Any]) -> bool:
    reports = record.get("precisions")
    if not isinstance(record.get("model_id"), str) or not isinstance(reports, dict):
        return False
    number = (int, float)
    return all(isinstance(r, dict) and isinstance(r.get("n"), int) and isinstance(r.get("flip_fraction"), number)
               and isinstance(r.get("d_auroc"), number) and isinstance(r.get("max_abs_dp"), number)
               for r in reports.values())


def record_path(path: Union[str, os.PathLike]) -> str:
    """Where ``write_record(path, ...)`` writes: a detector folder's ``precision.json``, or ``path``."""
    path = os.fspath(path)
    return os.path.join(path, RECORD_FILE) if os.path.isdir(path) else path


def write_record(path: Union[str, os.PathLike], record: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``record`` atomically to ``record_path(path)``; what was written. A record already
    there for the same weights, data, split and threshold keeps the precisions this one did not
    measure (bf16 measured once, int8 later: both stay)."""
    path = record_path(path)
    earlier = _read(path)
    if earlier and all(earlier.get(k) == record.get(k) for k in ("model_id", "data", "split", "threshold")):
        record = {**record, "precisions": {**earlier["precisions"], **record["precisions"]}}
    record = {**record, "format": RECORD_FORMAT}
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")
    return record


def bf16_verdict(record: Optional[Mapping[str, Any]], current_id: Optional[str]) -> tuple[bool, str]:
    """(may ``auto`` pick bf16 on a CPU with bf16 instructions, why) for a detector whose
    ``model_id`` is ``current_id``, given its record."""
    if record is None:
        return NOT_MEASURED
    if record.get("model_id") != current_id:
        return False, (f"{RECORD_FILE} was measured on other weights or calibration "
                       f"({record.get('model_id')}): measure again (aigid agreement)")
    report = (record.get("precisions") or {}).get("bf16")
    if report is None:
        return False, f"{RECORD_FILE} holds no bf16 measurement"
    shown = (f"{100 * report['flip_fraction']:.2f}% flips, dAUROC {report['d_auroc']:+.4f} on "
             f"{report['n']} images")
    if report["n"] < MIN_IMAGES:
        return False, f"bf16 measured on {report['n']} images; at least {MIN_IMAGES} are needed"
    if not within_bounds(report):
        return False, (f"bf16 strays from fp32 beyond the bounds ({shown}; bounds "
                       f"{100 * MAX_FLIPS:.1f}%, {MAX_D_AUROC})")
    return True, f"bf16 agrees with fp32 ({shown})"
