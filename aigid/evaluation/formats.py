"""Write an ``aigid.evaluate`` result in the files other detector frameworks write, so tables
can sit side by side.

One dataset of theirs is one generator of ours (``per_generator``; ``all`` when the data names
none). Clean numbers go to the folder itself; each perturbation of a robustness sweep goes to a
subfolder named after it (``jpeg95/``, ``blur2/``), as each of their runs writes its own folder.

- ``univfd`` -- UnivFD ``validate.py``: ``ap.txt`` (``key: AP%``) and ``acc0.txt``
  (``key: real%  fake%  acc%``), percentages rounded to 2 decimals, at threshold 0.5.
- ``sidbench`` -- SIDBench ``evaluate.py`` ``write_metrics``: the fixed-width tables ``ap.txt``,
  ``acc_05.txt`` and ``acc_oracle.txt``, and ``metrics.json`` (one record per dataset: ``ap``,
  ``roc_auc``, ``threshold_05``/``oracle_threshold`` with ``r_acc, f_acc, acc, tn, fp, fn, tp,
  ppv, npv, tpr, tnr``, ``best_threshold``, ``source``, ``generative_model``, ``family``).
  Not written: ``curves.json`` (it needs every score; the result holds metrics only). The
  oracle is aigid's exact best threshold, not SIDBench's 100-point grid (as high or higher).
- ``deepfakebench`` -- DeepfakeBench ``training/trainer/trainer.py`` ``save_metrics``:
  ``test/<key>/metric_dict_best.pickle`` with ``acc, auc, eer, ap, video_auc`` and
  ``test/avg/`` with their mean and ``dataset_dict`` (``key -> auc``), plus the same dicts as
  ``metric_dict_best.json`` (safe to read; a pickle is not). ``pred``/``label`` are left out
  (the result holds no scores); ``video_auc`` is the image AUC (each image its own video, as
  DeepfakeBench does for video-level methods).

Undefined metrics (None in the result, e.g. AUROC with one class) are written as ``nan`` where
the framework would print NaN, and as ``null`` in JSON.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from typing import Any, Callable, Optional, Union

log = logging.getLogger("aigid")

FORMATS = ("univfd", "sidbench", "deepfakebench")


def _f(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _component(key: str) -> str:
    """A generator name as one safe path component (names come from folders and manifests)."""
    safe = re.sub(r"[/\\\x00-\x1f]", "_", key)
    return safe if safe not in ("", ".", "..") else f"_{safe}_"


# ---------------------------------------------------------------------------------- UnivFD
def _univfd(folder: str, per_gen: dict[str, dict], result: dict) -> list[str]:
    def pct(v):  # validate.py: str(round(x * 100, 2))
        return str(round(_f(v) * 100, 2))

    ap = "".join(f"{k}: {pct(m.get('ap'))}\n" for k, m in per_gen.items())
    acc = "".join(f"{k}: {pct(m.get('real_acc'))}  {pct(m.get('fake_acc'))}  {pct(m.get('acc'))}\n"
                  for k, m in per_gen.items())
    return [_write(folder, "ap.txt", ap), _write(folder, "acc0.txt", acc)]


# -------------------------------------------------------------------------------- SIDBench
def _table(headers: list[list[str]], rows: list[list[str]]) -> str:
    """SIDBench's layout: columns 12 wide, the first left-aligned, a dashed rule under headers."""
    def line(cells):
        return " ".join([f"{cells[0]:<12}"] + [f"{c:>12}" for c in cells[1:]])
    return "".join(line(h) + "\n" for h in headers) + "-" * (12 * len(headers[0])) + "\n" + \
        "".join(line(r) + "\n" for r in rows)


def _at(m: dict, real: Optional[float], fake: Optional[float], acc: Optional[float]) -> dict:
    """SIDBench's ``calculate_for_threshold`` record, its counts recovered from the accuracies."""
    n_real, n_fake = m.get("n_real", 0), m.get("n_fake", 0)
    tn = round(real * n_real) if real is not None else 0
    tp = round(fake * n_fake) if fake is not None else 0
    fp, fn = n_real - tn, n_fake - tp

    def ratio(a, b):
        return a / b if b else 0

    return {"r_acc": _f(real), "f_acc": _f(fake), "acc": _f(acc), "tn": tn, "fp": fp, "fn": fn,
            "tp": tp, "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "tpr": ratio(tp, tp + fn),
            "tnr": ratio(tn, fp + tn)}


def _sidbench(folder: str, per_gen: dict[str, dict], result: dict) -> list[str]:
    def pct(v):
        return f"{_f(v) * 100:6.2f}"

    ap = _table([["Generative", "Average"], ["Model", "Precision"]],
                [[k, pct(m.get("ap"))] for k, m in per_gen.items()])
    acc05 = _table([["Generative", "TNR", "TPR", ""], ["Model", "(Reals)", "Fakes", "Accuracy"]],
                   [[k, pct(m.get("real_acc")), pct(m.get("fake_acc")), pct(m.get("acc"))]
                    for k, m in per_gen.items()])
    oracle = _table([["Generative", "TNR", "TPR", "", "Best"],
                     ["Model", "(Reals)", "Fakes", "Accuracy", "Threshold"]],
                    [[k, pct(m.get("oracle_real_acc")), pct(m.get("oracle_fake_acc")),
                      pct(m.get("oracle_acc")), f"{_f(m.get('oracle_threshold')):6.3f}"]
                     for k, m in per_gen.items()])
    source = (result.get("protocol") or {}).get("data") or "unknown"
    records = [{"ap": _f(m.get("ap")), "roc_auc": _f(m.get("auroc")),
                "threshold_05": _at(m, m.get("real_acc"), m.get("fake_acc"), m.get("acc")),
                "best_threshold": _f(m.get("oracle_threshold")),
                "oracle_threshold": _at(m, m.get("oracle_real_acc"), m.get("oracle_fake_acc"),
                                        m.get("oracle_acc")),
                "source": source, "generative_model": k, "family": "unknown"}
               for k, m in per_gen.items()]
    return [_write(folder, "ap.txt", ap), _write(folder, "acc_05.txt", acc05),
            _write(folder, "acc_oracle.txt", oracle),
            _write(folder, "metrics.json", json.dumps(_json_safe(records), indent=4) + "\n")]


# --------------------------------------------------------------------------- DeepfakeBench
_DFB_KEYS = ("acc", "auc", "eer", "ap", "video_auc")


def _deepfakebench(folder: str, per_gen: dict[str, dict], result: dict) -> list[str]:
    dicts = {k: {"acc": _f(m.get("acc")), "auc": _f(m.get("auroc")), "eer": _f(m.get("eer")),
                 "ap": _f(m.get("ap")), "video_auc": _f(m.get("auroc"))}
             for k, m in per_gen.items()}
    # trainer.py test_epoch: a plain mean over datasets (NaN stays NaN), dataset_dict = key -> auc
    avg: dict[str, Any] = {name: sum(d[name] for d in dicts.values()) / len(dicts)
                           for name in _DFB_KEYS}
    avg["dataset_dict"] = {k: d["auc"] for k, d in dicts.items()}
    written = []
    for key, d in [*((_component(k), d) for k, d in dicts.items()), ("avg", avg)]:
        sub = os.path.join(folder, "test", key)
        written.append(_write(sub, "metric_dict_best.pickle", pickle.dumps(d)))
        written.append(_write(sub, "metric_dict_best.json", json.dumps(_json_safe(d), indent=2)))
    return written


# ---------------------------------------------------------------------------------- common
def _write(folder: str, name: str, data: Union[str, bytes]) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


_WRITERS: dict[str, Callable[[str, dict, dict], list[str]]] = {
    "univfd": _univfd, "sidbench": _sidbench, "deepfakebench": _deepfakebench}


def write_report(result: dict[str, Any], path: Union[str, os.PathLike],
                 format: str = "sidbench") -> list[str]:
    """Write ``result`` (from ``aigid.evaluate``) into folder ``path`` as ``format`` (one of
    ``FORMATS``) writes it; returns the files written. Existing files of the same names are
    replaced; nothing else in the folder is touched."""
    if format not in _WRITERS:
        raise ValueError(f"unknown report format {format!r}: use one of {', '.join(FORMATS)}")
    threshold = (result.get("protocol") or {}).get("threshold", 0.5)
    if threshold != 0.5:
        log.warning("%s: %s reports accuracy at 0.5; these accuracies are at threshold %s",
                    os.fspath(path), format, threshold)
    conditions = [(os.fspath(path), result)]
    conditions += [(os.path.join(os.fspath(path), _component(name)), cond)
                   for name, cond in (result.get("robustness") or {}).items()]
    written: list[str] = []
    for folder, cond in conditions:
        per_gen = cond.get("per_generator") or {"all": cond["overall"]}
        written += _WRITERS[format](folder, per_gen, result)
    log.info("wrote %d %s report files under %s", len(written), format, os.fspath(path))
    return written
