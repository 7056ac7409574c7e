"""Plain-PyTorch twins of every aigid kernel: readable, slow, and the ground truth for tests.

They materialise what the fused kernels never do (the N×(N+A+M) similarity matrix, the
concatenated K/V), so keep them for CPU fallback and parity checks, not for large sizes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Finite stand-in for -inf on the self-similarity: a row whose only key is itself then gives
# finite (unused) values instead of NaN gradients. exp(MASKED - lse) underflows to exactly 0.
_MASKED = -1e30


def supcon_bank_loss_reference(
    feats: torch.Tensor,
    labels: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    r"""Supervised contrastive loss over the pool P = batch ∪ anchors ∪ bank (SupCon's L_out).

    Rows are the N batch embeddings ``feats`` (L2-normalised by the caller). For row i,

        L_i = -1/|Pos(i)| · Σ_{p∈Pos(i)} log( exp(s_ip/τ) / Σ_{a∈P∖{i}} exp(s_ia/τ) ),

    with s the dot product (cosine for unit vectors) and Pos(i) = {p ∈ P∖{i} : y_p = y_i}.
    The loss is the mean of L_i over rows with at least one positive, and 0 (still attached to
    the graph) when no row has one. Gradients flow to ``feats`` (as queries and as keys) and to
    ``anchors``; the bank is detached. Labels are arbitrary integer class ids.
    """
    n = feats.shape[0]
    dtype = torch.promote_types(feats.dtype, torch.float32)
    keys = torch.cat([feats, anchors.to(feats.dtype), bank_feats.detach().to(feats.dtype)], 0).to(dtype)
    key_labels = torch.cat([labels, anchor_labels, bank_labels]).to(labels.device)
    logits = feats.to(dtype) @ keys.T / temperature  # (N, N + A + M)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[:, :n] = torch.eye(n, dtype=torch.bool, device=feats.device)
    logits = logits.masked_fill(is_self, _MASKED)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == key_labels[None, :]) & ~is_self
    n_pos = positive.sum(1)
    has_pos = n_pos > 0
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1)
    if not bool(has_pos.any()):
        return (feats.sum() + anchors.sum()).to(dtype) * 0.0
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


def smsa_attention_reference(
    q: torch.Tensor,
    kv_sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
    kv_lengths: Optional[Sequence[Optional[torch.Tensor]]] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Non-causal attention of ``q`` over the concatenation of several K/V sources.

    q: (B, H_q, L_q, d); each source (k_s, v_s): (B, H_kv, L_s, d), H_q a multiple of H_kv
    (grouped-query attention). ``kv_lengths[s]`` (optional, (B,) ints) keeps only the first
    lengths[b] keys of source s for batch row b. A query row with no valid key at all gets a
    zero output. This is exactly what the fused kernel computes without the ``torch.cat``.
    """
    if not kv_sources:
        raise ValueError("smsa_attention needs at least one (k, v) source")
    b, h_q, _, _ = q.shape
    h_kv = kv_sources[0][0].shape[1]
    if h_q % h_kv:
        raise ValueError(f"query heads {h_q} must be a multiple of key/value heads {h_kv}")
    k = torch.cat([k_s for k_s, _ in kv_sources], dim=2).repeat_interleave(h_q // h_kv, dim=1)
    v = torch.cat([v_s for _, v_s in kv_sources], dim=2).repeat_interleave(h_q // h_kv, dim=1)
    if kv_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if len(kv_lengths) != len(kv_sources):
        raise ValueError("kv_lengths needs one entry (or None) per source")
    valid = []
    for (k_s, _), lengths in zip(kv_sources, kv_lengths):
        pos = torch.arange(k_s.shape[2], device=q.device)
        if lengths is None:
            valid.append(torch.ones(b, k_s.shape[2], dtype=torch.bool, device=q.device))
        else:
            valid.append(pos[None, :] < lengths.to(q.device)[:, None])
    valid = torch.cat(valid, dim=1)
    empty = ~valid.any(dim=1)  # (B,) rows with no key: attend to everything, then zero the output
    mask = (valid | empty[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(empty[:, None, None, None], 0.0)


def packed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention over a packed batch, one SDPA call per sample on its dense boolean mask.

    q: (T, H_q, d), k/v: (T, H_kv, d) in pack order; ``layout`` is an ``aigid.ops.packing.PackedLayout``
    (duck-typed: ``num_samples``, ``sample_range(b)`` and ``dense_mask(b)``, the ground truth of
    who sees whom). K/V are expanded to all query heads with ``repeat_interleave``, exactly as
    BAGEL's training attention does. Every query sees at least itself, so no row is empty.
    Returns (T, H_q, d).
    """
    h_q, h_kv = q.shape[1], k.shape[1]
    if h_q % h_kv:
        raise ValueError(f"query heads {h_q} must be a multiple of key/value heads {h_kv}")
    outs = []
    for b in range(layout.num_samples):
        s, e = layout.sample_range(b)
        qb = q[s:e].transpose(0, 1)
        kb = k[s:e].transpose(0, 1).repeat_interleave(h_q // h_kv, dim=0)
        vb = v[s:e].transpose(0, 1).repeat_interleave(h_q // h_kv, dim=0)
        mask = layout.dense_mask(b).to(q.device)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
                    .transpose(0, 1))
    return torch.cat(outs, dim=0)
