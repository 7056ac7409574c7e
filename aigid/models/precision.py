"""The precision a detector computes in: ``fp32``, ``bf16``, ``int8`` or ``auto``.

``bf16`` on a CPU is done the fast way: the weights themselves are cast to bfloat16, so every
matmul runs oneDNN's bf16 kernels (AVX512-BF16 / AMX). Autocast over fp32 weights — the naive
choice — converts each weight at each call and measured *slower* than fp32 here (0.35×). What
must stay fp32 stays fp32: the models normalise embeddings and anchors, apply softmax and
calibration in float32 whatever the weights are (MiraGe casts only its vision tower: the text
tower runs once per prompt update). On CUDA ``bf16`` is autocast over fp32 weights, as it always
was. ``auto``: bf16 on CUDA; on a CPU, bf16 where its flags show AMX-BF16 or AVX512-BF16 *and* this
detector's measured agreement with fp32 (``precision.json``, :mod:`aigid.models.precision_record`)
is within the bounds, else fp32 -- and it says why. Scores differ
between precisions, so a scan records the one it ran at beside each run.

``int8`` (MiraGe on a CPU) scores through ONNX Runtime's dynamically quantised graph of the vision
path (:mod:`aigid.models.int8`); the torch weights stay as loaded.

A recast detector keeps the id of the weights it was loaded with (``stored_model_id``), so
results stored at either precision resume each other, as a threshold change does.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Optional, Union

import torch

from aigid import backends
from aigid.models.identity import detector_layout, model_id
from aigid.models.precision_record import NOT_MEASURED, RECORD_FILE, bf16_verdict

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Why not one switch for every detector: bf16's agreement depends on the weights. On the demo's
# aligned held-out set (240 images, benchmarks/test_precision.py) bf16 flipped no verdict and moved
# P(fake) by <= 2e-3, yet AUROC by -0.0026 (trained tiny demo detector) and +0.0020 (random
# ViT-B/32): near-chance detectors reorder near-ties. So each detector carries its own measurement.


def _cpuinfo(field: str, cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The first ``field : value`` line of Linux's ``/proc/cpuinfo``; ``None`` where unreadable."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that cannot be read."""
    return frozenset((_cpuinfo("flags", cpuinfo) or "").split())


Agreement = Union[tuple[bool, str], Callable[[], tuple[bool, str]]]


@functools.lru_cache(maxsize=1)
def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform

    return _cpuinfo("model name", cpuinfo) or platform.processor() or platform.machine()


def decide(precision: str, device: torch.device, flags: Optional[Iterable[str]] = None,
           agreement: Agreement = NOT_MEASURED) -> tuple[str, str]:
    """(``precision`` for ``device`` with ``auto`` decided, why). ``flags``: the CPU's (read by
    default); ``agreement``: whether bf16 is shown to agree with fp32 for this detector, and why
    (``aigid.models.precision_record.bf16_verdict``), or a function giving it, called only where
    it decides (it may hash the weights)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and device.type == "cuda":
        raise ValueError("precision='int8' runs on a CPU (ONNX Runtime); on CUDA use bf16")
    if precision != "auto":
        return precision, "asked for"
    if device.type == "cuda":
        return "bf16", "bf16 autocast on CUDA"
    have = cpu_flags() if flags is None else frozenset(flags)
    if not any(f in have for f in BF16_CPU_FLAGS):
        return "fp32", "this CPU has no AMX-BF16/AVX512-BF16"
    agrees, why = agreement() if callable(agreement) else agreement
    return ("bf16", why) if agrees else ("fp32", why)


def resolve(precision: str, device: torch.device, flags: Optional[Iterable[str]] = None,
            agreement: Agreement = NOT_MEASURED) -> str:
    """``decide``'s choice alone."""
    return decide(precision, device, flags, agreement)[0]


def _agreement_of(model: Any) -> tuple[bool, str]:
    record = getattr(model, "precision_record", None)
    return NOT_MEASURED if record is None else bf16_verdict(record, model_id(model))  # no record: no hashing


def precision_of(model: Any) -> str:
    """The precision ``model`` computes in: what ``set_precision`` chose, else what aigid does
    unasked (bf16 autocast on CUDA, fp32 on a CPU) -- what results record beside their scores."""
    on_cuda = getattr(getattr(model, "device", None), "type", None) == "cuda"
    return getattr(model, "precision", None) or ("bf16" if on_cuda else "fp32")


def auto_choice() -> dict[str, Any]:
    """What ``auto`` picks on this machine's CPU, and why (``aigid backends``)."""
    fast = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    if fast:
        chosen, why = "bf16 or fp32", (f"bf16 for a detector whose {RECORD_FILE} shows it agrees with fp32 "
                                       "(aigid agreement DETECTOR DATA), fp32 otherwise")
    else:
        chosen, why = decide("auto", torch.device("cpu"))
    return {"cpu": chosen, "cpu_bf16_flags": fast, "why": why}


def set_precision(model: Any, precision: Optional[str] = "auto", flags: Optional[Iterable[str]] = None) -> str:
    """Make ``model`` (MiraGe or UniGenDet, built in fp32) compute in ``precision``; what it
    picked. ``None``: what aigid did before the switch existed (bf16 autocast on CUDA, fp32 on a
    CPU), without recasting anything. Weights are recast only for bf16 on a CPU, once: asking again for the precision a model
    already has does nothing, and a recast model cannot go back to fp32 (load it again)."""
    if precision is None:
        precision = "bf16" if model.device.type == "cuda" else "fp32"
    chosen, why = decide(precision, model.device, flags, lambda: _agreement_of(model))
    if chosen == getattr(model, "precision", None):
        return chosen
    if getattr(model, "weights_recast", False):
        raise ValueError(f"this detector's weights were recast to {model.precision}; load it again for {chosen}")
    if chosen == "int8":  # the weights stay as loaded: a second, int8 graph scores
        from aigid.models.int8 import int8_forward
        model.int8_forward = int8_forward(model)
    else:
        model.__dict__.pop("int8_forward", None)
    if model.device.type != "cuda" and chosen == "bf16":
        model.stored_model_id, model.stored_layout = model_id(model), detector_layout(model)
        # only what the model lists as safe to compute in bf16 (MiraGe: the vision tower; its text
        # tower runs once per prompt update, so the anchors stay exact fp32 for free)
        for module in getattr(model, "bf16_modules", lambda: [model])():
            module.to(torch.bfloat16)
        model.__dict__.pop("_anchor_cache", None)  # MiraGe's anchors: recomputed by the bf16 text tower
        model.weights_recast = True
    model.precision = chosen
    model.precision_why = why
    backends.announce("precision", f"{chosen} (auto: {why})" if precision == "auto" else chosen)
    return chosen
