"""The public ops: the one place that picks a backend.

Each op runs its Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``) and its plain-PyTorch
reference elsewhere; ``AIGID_FORCE_REFERENCE=1`` or ``backend="reference"`` selects the
reference anywhere. Models call these functions and never import kernels directly.
"""
from __future__ import annotations

import functools
import importlib
from typing import Literal, Optional, Sequence

import torch

from aigid import backends
from aigid.kernels import reference

Backend = Optional[Literal["auto", "triton", "reference"]]

__all__ = ["supcon_bank_loss", "smsa_attention"]


def _pick(op: str, backend: Backend, device: torch.device, kernel_ready: bool) -> str:
    if backend in (None, "auto"):
        use = kernel_ready and not backends.force_reference() and backends.triton_usable(device)
        choice = "triton" if use else "reference"
    elif backend == "reference":
        choice = backend
    elif backend == "triton":
        if not kernel_ready:
            raise RuntimeError(f"{op}: no Triton kernel is available in this build")
        if not backends.triton_usable(device, explicit=True):
            raise RuntimeError(f"{op}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 on CPU "
                               f"(got {device.type} tensors)")
        choice = backend
    else:
        raise ValueError(f"{op}: unknown backend {backend!r} (auto, triton or reference)")
    backends.announce(op, choice)
    return choice


def _check_supcon(feats, labels, bank_feats, bank_labels, anchors, anchor_labels) -> None:
    if feats.ndim != 2:
        raise ValueError(f"feats must be (N, D), got {tuple(feats.shape)}")
    d = feats.shape[1]
    for name, x, y in (("feats", feats, labels), ("bank_feats", bank_feats, bank_labels),
                       ("anchors", anchors, anchor_labels)):
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"{name} must be (*, {d}), got {tuple(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has {x.shape[0]} rows but its labels have shape {tuple(y.shape)}")
        if y.is_floating_point():
            raise TypeError(f"labels for {name} must be integer class ids, got {y.dtype}")


@functools.cache
def _kernel_module(name: str):
    """``aigid.kernels.<name>``, imported once on first use; None when Triton is missing."""
    if not backends.has_triton():
        return None
    try:
        return importlib.import_module(f"aigid.kernels.{name}")
    except (ImportError, RuntimeError):
        return None


def supcon_bank_loss(
    feats: torch.Tensor,
    labels: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    temperature: float = 0.07,
    *,
    backend: Backend = None,
) -> torch.Tensor:
    """MiraGe's L_dis: supervised contrastive loss over batch ∪ text anchors ∪ memory bank.

    Features are L2-normalised by the caller; the bank may be empty ((0, D) and (0,)); labels are
    integer class ids. See ``aigid.kernels.reference.supcon_bank_loss_reference`` for the formula.
    """
    _check_supcon(feats, labels, bank_feats, bank_labels, anchors, anchor_labels)
    kernel = _kernel_module("supcon_bank")
    ready = kernel is not None
    if ready and backend in (None, "auto") and feats.dtype not in kernel.SUPPORTED_DTYPES:
        ready = False  # e.g. float64: automatic dispatch keeps the exact reference
    choice = _pick("supcon", backend, feats.device, kernel_ready=ready)
    if choice == "triton":
        return kernel.supcon_bank_loss_triton(
            feats, labels, bank_feats, bank_labels, anchors, anchor_labels, temperature)
    return reference.supcon_bank_loss_reference(
        feats, labels, bank_feats, bank_labels, anchors, anchor_labels, temperature)


def _check_smsa(q, kv_sources, kv_lengths) -> None:
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise ValueError(f"q must be (B, H_q, L_q, d), got {getattr(q, 'shape', type(q))}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    b, h_q, _, d = q.shape
    if len(kv_sources) == 0:
        raise ValueError("smsa_attention needs at least one (k, v) source")
    h_kv = None
    for i, pair in enumerate(kv_sources):
        if len(pair) != 2:
            raise ValueError(f"source {i} must be a (k, v) pair")
        k, v = pair
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"source {i}: k and v must both be (B, H_kv, L_s, d), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != b or k.shape[3] != d:
            raise ValueError(f"source {i}: expected (B={b}, H_kv, L_s, d={d}), got {tuple(k.shape)}")
        if h_kv is None:
            h_kv = k.shape[1]
        elif k.shape[1] != h_kv:
            raise ValueError(f"source {i} has {k.shape[1]} key/value heads, source 0 has {h_kv}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"source {i}: k/v dtypes {k.dtype}/{v.dtype} differ from q's {q.dtype}")
        if k.device != q.device or v.device != q.device:
            raise ValueError(f"source {i} is on {k.device}/{v.device}, q on {q.device}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"query heads {h_q} must be a multiple of key/value heads {h_kv}")
    if kv_lengths is not None:
        if len(kv_lengths) != len(kv_sources):
            raise ValueError(f"kv_lengths has {len(kv_lengths)} entries for {len(kv_sources)} sources")
        for i, n in enumerate(kv_lengths):
            if n is None:
                continue
            if not isinstance(n, torch.Tensor) or n.shape != (b,):
                raise ValueError(f"kv_lengths[{i}] must be a ({b},) tensor or None, got "
                                 f"{getattr(n, 'shape', type(n))}")
            if n.is_floating_point() or n.dtype == torch.bool or n.is_complex():
                raise TypeError(f"kv_lengths[{i}] must hold integers, got {n.dtype}")


def smsa_attention(
    q: torch.Tensor,
    kv_sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
    kv_lengths: Optional[Sequence[Optional[torch.Tensor]]] = None,
    scale: Optional[float] = None,
    *,
    backend: Backend = None,
) -> torch.Tensor:
    """UniGenDet's SMSA: queries from one stream attend over several K/V sources, non-causally.

    q: (B, H_q, L_q, d); kv_sources: [(k_s, v_s)] each (B, H_kv, L_s, d); optional per-source
    valid lengths (B,); scale defaults to d**-0.5. Returns (B, H_q, L_q, d).

    The Triton kernel (``aigid.kernels.smsa_attention``) reads each source in place, with native
    GQA and no concatenation; it takes 1-4 sources, head dims 16/32/64/128 and fp16/bf16/fp32.
    Automatic dispatch uses it on CUDA for those inputs and the reference otherwise;
    ``backend="triton"`` raises for inputs the kernel does not take.
    """
    _check_smsa(q, kv_sources, kv_lengths)
    wants_kernel = backend == "triton" or (
        backend in (None, "auto") and not backends.force_reference()
        and backends.triton_usable(q.device))
    kernel = _kernel_module("smsa_attention") if wants_kernel else None
    reason = None if kernel is None else kernel.unsupported_reason(q, kv_sources)
    if backend == "triton" and reason is not None:
        raise ValueError(f"smsa_attention: {reason}; use backend='auto' or 'reference'")
    choice = _pick("smsa", backend, q.device, kernel_ready=kernel is not None and reason is None)
    if choice == "triton":
        return kernel.smsa_attention_triton(q, kv_sources, kv_lengths, scale)
    return reference.smsa_attention_reference(q, kv_sources, kv_lengths, scale)
