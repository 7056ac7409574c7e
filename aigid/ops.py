"""The public ops: the one place that picks a backend.

Each op runs its Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``) and its plain-PyTorch
reference elsewhere; ``AIGID_FORCE_REFERENCE=1`` or ``backend="reference"`` selects the
reference anywhere. Models call these functions and never import kernels directly.
"""
from __future__ import annotations

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
    choice = _pick("supcon", backend, feats.device, kernel_ready=False)
    if choice == "triton":  # pragma: no cover - wired when the kernel lands
        raise RuntimeError("unreachable")
    return reference.supcon_bank_loss_reference(
        feats, labels, bank_feats, bank_labels, anchors, anchor_labels, temperature)


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
    """
    choice = _pick("smsa", backend, q.device, kernel_ready=False)
    if choice == "triton":  # pragma: no cover - wired when the kernel lands
        raise RuntimeError("unreachable")
    return reference.smsa_attention_reference(q, kv_sources, kv_lengths, scale)
