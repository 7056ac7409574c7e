"""The precision a detector computes in: ``fp32``, ``bf16``, ``int8`` or ``auto``.

``bf16`` on a CPU is done the fast way: the weights themselves are cast to bfloat16, so every
matmul runs oneDNN's bf16 kernels (AVX512-BF16 / AMX). Autocast over fp32 weights — the naive
choice — converts each weight at each call and measured *slower* than fp32 here (0.35×). What
must stay fp32 stays fp32: the models normalise embeddings and anchors, apply softmax and
calibration in float32 whatever the weights are (MiraGe casts only its vision tower: the text
tower runs once per prompt update). On CUDA ``bf16`` is autocast over fp32 weights, as it always
was. ``auto``: bf16 on CUDA; on a CPU, bf16 where its flags show AMX-BF16 or AVX512-BF16 *and*
``CPU_BF16_AUTO`` says bf16's agreement with fp32 is shown (not yet), else fp32. Scores differ
between precisions, so a scan records the one it ran at beside each run.

``int8`` (MiraGe on a CPU) scores through ONNX Runtime's dynamically quantised graph of the vision
path (:mod:`aigid.models.int8`); the torch weights stay as loaded.

A recast detector keeps the id of the weights it was loaded with (``stored_model_id``), so
results stored at either precision resume each other, as a threshold change does.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterable, Optional

import torch

from aigid import backends
from aigid.models.identity import detector_layout, model_id

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# ``auto`` picks bf16 on a CPU only once bf16 is shown to agree with fp32 (verdict flips <= 0.5%,
# |dAUROC| <= 0.002 on a labelled set; aigid.evaluation.agreement). Not yet: on the demo's aligned
# held-out set (240 images, benchmarks/test_precision.py) bf16 flipped no verdict and moved P(fake)
# by <= 2e-3, but AUROC by -0.0026 (trained tiny demo detector) and +0.0020 (random ViT-B/32) --
# over the bar, if only just, on near-chance detectors. Until trained weights are measured ``auto``
# stays fp32 on CPUs and says why; ``bf16`` can always be asked for.
CPU_BF16_AUTO = False


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve(precision: str, device: torch.device, flags: Optional[Iterable[str]] = None,
            cpu_bf16_auto: Optional[bool] = None) -> str:
    """``precision`` for ``device``, with ``auto`` decided (``flags``: the CPU's, by default read;
    ``cpu_bf16_auto``: whether auto may pick bf16 on a CPU at all, default ``CPU_BF16_AUTO``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and device.type == "cuda":
        raise ValueError("precision='int8' runs on a CPU (ONNX Runtime); on CUDA use bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    have = cpu_flags() if flags is None else frozenset(flags)
    allowed = CPU_BF16_AUTO if cpu_bf16_auto is None else cpu_bf16_auto
    return "bf16" if allowed and any(f in have for f in BF16_CPU_FLAGS) else "fp32"


def auto_choice() -> dict[str, Any]:
    """What ``auto`` picks on this machine's CPU, and why (``aigid backends``)."""
    fast = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    why = ("bf16 weights on this CPU" if resolve("auto", torch.device("cpu")) == "bf16" else
           "fp32: no AMX/AVX512-BF16" if not fast else
           "fp32: bf16 is here but its agreement with fp32 is not yet shown (ask for --precision bf16)")
    return {"cpu": resolve("auto", torch.device("cpu")), "cpu_bf16_flags": fast, "why": why}


def set_precision(model: Any, precision: Optional[str] = "auto", flags: Optional[Iterable[str]] = None) -> str:
    """Make ``model`` (MiraGe or UniGenDet, built in fp32) compute in ``precision``; what it
    picked. ``None``: what aigid did before the switch existed (bf16 autocast on CUDA, fp32 on a
    CPU), without recasting anything. Weights are recast only for bf16 on a CPU, once: asking again for the precision a model
    already has does nothing, and a recast model cannot go back to fp32 (load it again)."""
    if precision is None:
        precision = "bf16" if model.device.type == "cuda" else "fp32"
    chosen = resolve(precision, model.device, flags)
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
    backends.announce("precision", f"{chosen} ({precision})" if precision == "auto" else chosen)
    return chosen
