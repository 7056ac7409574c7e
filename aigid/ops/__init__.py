"""The public ops: the one place that picks a backend.

Each op runs its Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``) and its plain-PyTorch
reference elsewhere; ``AIGID_FORCE_REFERENCE=1`` or ``backend="reference"`` selects the
reference anywhere. Models call these functions and never import kernels directly.
"""
from __future__ import annotations

import functools
import importlib
import itertools
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from aigid import backends
from aigid.kernels import reference
from aigid.ops.packing import PackedLayout

Backend = Optional[Literal["auto", "triton", "reference"]]
AttentionBackend = Optional[Literal["auto", "flash-attn", "sdpa", "reference"]]

__all__ = ["supcon_bank_loss", "smsa_attention", "packed_attention"]


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


# ----------------------------------------------------------------------------------------------
# Packed attention for the MoT backbone
# ----------------------------------------------------------------------------------------------

_ATTENTION_BACKENDS = ("auto", "flash-attn", "sdpa", "reference")
_SMSA_MAX_SOURCES = 4  # what the fused SMSA kernel reads in place (kernels/smsa_attention.py)


def _check_packed(q, k, v, layout) -> None:
    if not isinstance(layout, PackedLayout):
        raise TypeError(f"layout must be an aigid.ops.packing.PackedLayout, got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"{name} must be (T, heads, d), got {getattr(x, 'shape', type(x))}")
        if x.shape[0] != layout.total:
            raise ValueError(f"{name} has {x.shape[0]} tokens, the layout packs {layout.total}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q head dim {q.shape[2]} differs from k/v head dim {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q/k/v devices differ: {q.device}, {k.device}, {v.device}")


def _flash_attn_ready(q: torch.Tensor) -> bool:
    return (backends.has_flash_attn() and q.device.type == "cuda"
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)


def _pick_attention(backend: AttentionBackend, q: torch.Tensor) -> str:
    if backend in (None, "auto"):
        if backends.force_reference():
            choice = "reference"
        else:
            choice = "flash-attn" if _flash_attn_ready(q) else "sdpa"
    elif backend == "flash-attn":
        if not backends.has_flash_attn():
            raise RuntimeError("packed_attention: backend='flash-attn' but flash_attn is not installed")
        if not _flash_attn_ready(q):
            raise ValueError(f"packed_attention: flash-attn needs CUDA fp16/bf16 tensors with head dim "
                             f"<= 256, got {q.device.type} {q.dtype} d={q.shape[-1]}")
        choice = backend
    elif backend in ("sdpa", "reference"):
        choice = backend
    else:
        raise ValueError(f"packed_attention: unknown backend {backend!r} ({', '.join(_ATTENTION_BACKENDS)})")
    backends.announce("attention", choice)
    return choice


def _causal_split(q, sources, scale):
    """Bottom-right causal SDPA of (n, H_q, L_q, d) queries over the concatenated sources."""
    if len(sources) == 1:
        k, v = sources[0]
    else:  # only when hidden splits break the visible prefix into several runs
        k = torch.cat([k_s for k_s, _ in sources], dim=2)
        v = torch.cat([v_s for _, v_s in sources], dim=2)
    l_q, l_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if l_q == l_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    # CausalBias dispatches to the fused kernels' own lower-right causal mode where they have one.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(l_q, l_k),
                                          scale=scale, enable_gqa=gqa)


def _packed_splitwise(q, k, v, layout: PackedLayout, scale: float) -> torch.Tensor:
    """One call per split (per group of identically structured samples), on strided views.

    Image splits read their sources in place through ``smsa_attention`` (fused kernel on CUDA);
    text splits use SDPA with a bottom-right causal mask over [visible prefix; own split].

    Views are taken hierarchically — ``torch.split`` into groups, then into query splits, slices
    for the K/V runs only inside a group — because autograd's slice backward materialises a
    zero gradient as large as the sliced tensor: slicing the whole pack once per split would
    cost O(splits × T) memory traffic in backward, this costs O(splits per sample × T).
    """
    plan = layout.attention_plan()
    sizes = [g.count * g.length for g in plan]
    outs = []
    for g, qg, kg, vg in zip(plan, q.split(sizes), k.split(sizes), v.split(sizes)):
        qg, kg, vg = (x.unflatten(0, (g.count, g.length)) for x in (qg, kg, vg))
        q_parts = qg.split([sp.end - sp.start for sp in g.splits], dim=1)
        parts = []
        for sp, qs in zip(g.splits, q_parts):
            qs = qs.transpose(1, 2)  # (n, H_q, L, d), a view
            src = [(kg[:, s:e].transpose(1, 2), vg[:, s:e].transpose(1, 2)) for s, e in sp.runs]
            if sp.causal:
                o = _causal_split(qs, src, scale)
            else:
                if len(src) > _SMSA_MAX_SOURCES:  # rare: many hidden splits before this one
                    extra = len(src) - _SMSA_MAX_SOURCES + 1
                    src = [(torch.cat([k_s for k_s, _ in src[:extra]], dim=2),
                            torch.cat([v_s for _, v_s in src[:extra]], dim=2)), *src[extra:]]
                o = smsa_attention(qs, src, scale=scale)
            parts.append(o.transpose(1, 2))
        og = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        outs.append(og.reshape(g.count * g.length, *og.shape[2:]))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def _varlen_indices(layout: PackedLayout, device: torch.device) -> dict:
    """Split-major gather indices for a varlen kernel: per mode (causal text / full image), the
    query positions, the gathered key positions and their cu_seqlens, plus the permutation back."""
    modes = {}
    for causal in (True, False):
        q_idx, k_idx, len_q, len_k = [], [], [], []
        for b in range(layout.num_samples):
            for i, sp in enumerate(layout.samples[b]):
                if sp.causal != causal:
                    continue
                s, e = layout.split_range(b, i)
                q_idx.append(torch.arange(s, e))
                runs = layout.visible_runs(b, i)
                k_idx.extend(torch.arange(rs, re) for rs, re in runs)
                len_q.append(e - s)
                len_k.append(sum(re - rs for rs, re in runs))
        if not q_idx:
            continue

        def cu(lengths):
            return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        modes[causal] = dict(q=torch.cat(q_idx).to(device), k=torch.cat(k_idx).to(device),
                             cu_q=cu(len_q), cu_k=cu(len_k), max_q=max(len_q), max_k=max(len_k))
    order = torch.cat([m["q"] for m in modes.values()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return dict(modes=modes, inverse=inverse)


def _packed_varlen(q, k, v, layout: PackedLayout, scale: float, varlen_fn: Callable) -> torch.Tensor:
    """flash-attn style: each split is one varlen sequence; K/V gathered per split; one call for
    the causal (text) splits and one for the full (image) splits; native GQA. ``varlen_fn`` has
    ``flash_attn_varlen_func``'s signature (causal is bottom-right aligned)."""
    idx = layout.cached(("varlen", q.device), lambda: _varlen_indices(layout, q.device))
    outs = []
    for causal, m in idx["modes"].items():
        qm = q.index_select(0, m["q"])
        km, vm = k.index_select(0, m["k"]), v.index_select(0, m["k"])
        outs.append(varlen_fn(qm, km, vm, m["cu_q"], m["cu_k"], m["max_q"], m["max_k"],
                              dropout_p=0.0, softmax_scale=scale, causal=causal))
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    return out.index_select(0, idx["inverse"])


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    scale: Optional[float] = None,
    *,
    backend: AttentionBackend = None,
) -> torch.Tensor:
    """Attention over a packed batch of mixed text / ViT / VAE splits (the MoT's shared attention).

    q: (T, H_q, d), k/v: (T, H_kv, d) in pack order, H_q a multiple of H_kv (GQA); who sees whom
    is ``layout.dense_mask`` (isolated samples, causal text, full image splits, hidden splits
    invisible to others). scale defaults to d**-0.5. Returns (T, H_q, d).

    Backends: ``"reference"`` — per-sample SDPA on the dense mask with K/V expanded to all heads
    (BAGEL's training attention; the ground truth); ``"sdpa"`` — split-wise, no dense mask:
    image splits read [visible earlier runs; own split] in place through ``smsa_attention``, text
    splits use SDPA with a bottom-right causal mask; ``"flash-attn"`` — ``flash_attn_varlen_func``
    split-major with K/V gathered per split. ``None``/``"auto"``: flash-attn when installed and the
    tensors are CUDA fp16/bf16, else sdpa (``AIGID_FORCE_REFERENCE=1``: reference).
    """
    _check_packed(q, k, v, layout)
    choice = _pick_attention(backend, q)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if choice == "reference":
        return reference.packed_attention_reference(q, k, v, layout, scale)
    if choice == "flash-attn":
        from flash_attn import flash_attn_varlen_func

        return _packed_varlen(q, k, v, layout, scale, flash_attn_varlen_func)
    return _packed_splitwise(q, k, v, layout, scale)
