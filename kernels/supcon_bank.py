r"""Fused memory-bank supervised-contrastive loss (MiraGe's L_dis): Triton fwd + bwd kernels.

Computes exactly what :func:`aigid.kernels.reference.supcon_bank_loss_reference` computes —
SupCon's L_out over the key pool P = batch ∪ anchors ∪ bank, rows = the N batch embeddings —
without ever materialising the N×(N+A+M) logit matrix or ``torch.cat``-ing the pool.

Notation: queries q_i = feats[i]; keys k_j from three sources read through their own pointers
(batch ``feats`` (N rows), ``anchors`` (A rows), ``bank`` (M rows, detached)); the key index j
runs over the *virtual* concatenation [0, N) ∪ [N, N+A) ∪ [N+A, N+A+M). Logits l_ij = q_i·k_j/τ;
self (j = i inside the batch source) is excluded from every sum; positives are keys with the
same integer label as row i, self excluded.

Forward (``_supcon_fwd_kernel``), grid ``(cdiv(N, BLOCK_M), key_splits)``
    Each program owns BLOCK_M query rows and one contiguous slice of the virtual key range (the
    slice may straddle sources; each source is scanned with its own loop and pointer). Key
    blocks of BLOCK_N columns stream through; the logit tile is built in registers from
    BLOCK_D-wide slices of D (so D = 768 / 1024, or an odd D such as 33, is tiled and masked),
    and three per-row statistics are updated: an online log-sum-exp (base-2, flash-attention's
    running max + rescaled sum), the sum of positive logits and the number of positives. Only
    these O(N) statistics are stored, one set per key split (flash-decoding's split-K keeps the
    GPU busy when N is small and the bank is large); a tiny torch epilogue merges the splits
    (``logsumexp`` over splits) and forms the loss
        L = mean_{i: n_pos_i > 0} (lse_i - pos_sum_i / n_pos_i),
    0 when no row has a positive (still attached to the graph; all gradients are then 0).

Backward: with w_i = 1/N_valid for rows with positives (0 otherwise) and g the upstream scalar,
    dL/dl_ij = g · w_i · (softmax_ij - pos_ij / n_pos_i),
    dq_i = Σ_j dL/dl_ij · k_j / τ      (every key: batch, anchors, bank)
    dk_j = Σ_i dL/dl_ij · q_i / τ      (only batch and anchor keys: the bank is detached).
    ``grad_feats = dq + dk[:N]`` (feats are queries *and* keys), ``grad_anchors = dk[N:]``.
    Logits are recomputed block by block from the saved per-row lse (flash-attention style);
    the factor g·w_i/τ and g·w_i/(τ·n_pos_i) are folded into two O(N) row vectors.

    * ``_supcon_bwd_dq_kernel``, grid ``(cdiv(N, BLOCK_M), cdiv(D, BLOCK_DO), key_splits)``:
      the forward's row-streaming pass again, accumulating dq for BLOCK_DO output features in
      registers. D-wide accumulators do not fit in registers for D = 768, so the output feature
      dimension is split over the grid and the logit tile is recomputed once per split (no
      recompute while D ≤ BLOCK_DO, i.e. 256 for 16-bit inputs; 3× for D = 768). Key splits
      write fp32 partials ``(splits, N, D)`` that torch sums: deterministic, and only used when
      N alone cannot fill the GPU, so bounded by ~2 programs per SM × BLOCK_M × BLOCK_DO.
    * ``_supcon_bwd_dk_kernel``, grid ``(cdiv(N + A, BLOCK_N), cdiv(D, BLOCK_DO))``: the
      flash-attention dK/dV pattern — each program owns a block of *key* columns (batch keys,
      then anchors; one column block may straddle both, read through two masked loads) and
      streams every query row block, accumulating dk in registers. No atomics: every output
      element has exactly one writer, so the result is deterministic, and the large bank never
      enters this pass (it needs no gradient). Its cost is O(N·(N+A)·D), small next to dq's
      O(N·(N+A+M)·D). The alternative — atomically adding gᵀ·q into dk from the dq pass —
      would save that extra Q·Kᵀ over N+A columns but costs N/BLOCK_M × (N+A) × D fp32
      atomics and makes the gradient run-to-run non-deterministic.

    Neither pass allocates anything larger than O((N + A)·D) plus the bounded split partials,
    and neither the forward nor the backward waits on the host (no ``.item()``).

Precision: tiles are loaded in the input dtype (bf16/fp16 go to tensor cores), every dot
accumulates in fp32, fp32 inputs use IEEE fp32 dots (no TF32) so they match the reference to
~1e-6; softmax weights are cast to the key dtype before the gradient dot, as flash-attention
does. The loss is fp32; gradients come back in the dtypes of ``feats`` and ``anchors``.
Anchors and bank are cast to ``feats.dtype`` first, as the reference does.

Block sizes are fixed heuristics (``_config``), checked for register spills with ptxas for
sm_90 but not autotuned on hardware; under ``TRITON_INTERPRET=1`` (CPU tests) small 16-wide
blocks exercise every tiling path. Labels are compared as int64, so any integer ids work.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["SupConBankLossFunction", "supcon_bank_loss_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOG2E = 1.4426950408889634
# lse sentinel (base 2) for rows without positives: their weight is 0, and exp2(s - 1e30) is an
# exact 0, so these rows contribute nothing and never produce inf/NaN in the backward.
_NO_ROW = 1e30


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(q_ptr, stride_q, rows, row_mask, k_ptr, stride_k, cols, col_mask, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of q·kᵀ, reduced over D in BLOCK_D slices (masked)."""
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    k_base = k_ptr + cols.to(tl.int64)[:, None] * stride_k
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_mask = dd < D
        q = tl.load(q_base + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        k = tl.load(k_base + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), s, input_precision=DOT_PREC)
    return s


@triton.jit
def _fwd_scan(q_ptr, stride_q, rows, row_mask, row_lab,
              k_ptr, stride_k, klab_ptr, start, stop, D, qk_scale,
              m_i, l_i, pos_sum, n_pos,
              IS_BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Stream keys [start, stop) of one source; update the online (base-2) row statistics."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        col_mask = cols < stop
        s = _logit_tile(q_ptr, stride_q, rows, row_mask, k_ptr, stride_k, cols, col_mask, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC) * qk_scale
        valid = col_mask[None, :] & (rows[:, None] >= 0)
        if IS_BATCH:
            valid = valid & (rows[:, None] != cols[None, :])
        klab = tl.load(klab_ptr + cols, mask=col_mask, other=0)
        pos = valid & (row_lab[:, None] == klab[None, :])
        s_m = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_m, 1))
        # rows that have seen no valid key yet keep m = -inf; subtract 0 there, not -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s_m - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
        n_pos += tl.sum(pos.to(tl.int32), 1)
    return m_i, l_i, pos_sum, n_pos


@triton.jit
def _supcon_fwd_kernel(
    f_ptr, a_ptr, b_ptr, lab_ptr, alab_ptr, blab_ptr,
    lse_ptr, pos_ptr, npos_ptr,  # (splits, N) partial statistics
    N, A, M, D, stride_f, stride_a, stride_b, qk_scale, split_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    row_lab = tl.load(lab_ptr + rows, mask=row_mask, other=0)

    lo = pid_s * split_len  # this program's slice [lo, hi) of the virtual key range
    hi = lo + split_len
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_pos = tl.zeros((BLOCK_M,), dtype=tl.int32)

    start = tl.minimum(lo, N)
    stop = tl.minimum(hi, N)
    m_i, l_i, pos_sum, n_pos = _fwd_scan(
        f_ptr, stride_f, rows, row_mask, row_lab, f_ptr, stride_f, lab_ptr, start, stop, D,
        qk_scale, m_i, l_i, pos_sum, n_pos, True, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    start = tl.minimum(tl.maximum(lo - N, 0), A)
    stop = tl.minimum(tl.maximum(hi - N, 0), A)
    m_i, l_i, pos_sum, n_pos = _fwd_scan(
        f_ptr, stride_f, rows, row_mask, row_lab, a_ptr, stride_a, alab_ptr, start, stop, D,
        qk_scale, m_i, l_i, pos_sum, n_pos, False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    start = tl.minimum(tl.maximum(lo - N - A, 0), M)
    stop = tl.minimum(tl.maximum(hi - N - A, 0), M)
    m_i, l_i, pos_sum, n_pos = _fwd_scan(
        f_ptr, stride_f, rows, row_mask, row_lab, b_ptr, stride_b, blab_ptr, start, stop, D,
        qk_scale, m_i, l_i, pos_sum, n_pos, False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)

    # natural-log lse of this split (0.693… = ln 2); -inf where the split held no valid key
    has_key = l_i > 0
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    out = pid_s * N + rows
    tl.store(lse_ptr + out, lse, mask=row_mask)
    tl.store(pos_ptr + out, pos_sum * 0.6931471805599453, mask=row_mask)
    tl.store(npos_ptr + out, n_pos, mask=row_mask)


@triton.jit
def _dq_scan(q_ptr, stride_q, rows, row_mask, row_lab, lse2, coef, coef_pos,
             k_ptr, stride_k, klab_ptr, start, stop, D, qk_scale, acc, offs_do, do_mask,
             IS_BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Stream keys [start, stop) of one source; acc += dL/dlogit · k[:, offs_do] (τ folded in)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        col_mask = cols < stop
        s = _logit_tile(q_ptr, stride_q, rows, row_mask, k_ptr, stride_k, cols, col_mask, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC) * qk_scale
        valid = col_mask[None, :] & (rows[:, None] >= 0)
        if IS_BATCH:
            valid = valid & (rows[:, None] != cols[None, :])
        klab = tl.load(klab_ptr + cols, mask=col_mask, other=0)
        pos = valid & (row_lab[:, None] == klab[None, :])
        p = tl.where(valid, tl.exp2(tl.where(valid, s, 0.0) - lse2[:, None]), 0.0)
        g = coef[:, None] * p - tl.where(pos, coef_pos[:, None], 0.0)
        ko = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_k + offs_do[None, :],
                     mask=col_mask[:, None] & do_mask[None, :], other=0.0)
        acc = tl.dot(g.to(ko.dtype), ko, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _supcon_bwd_dq_kernel(
    f_ptr, a_ptr, b_ptr, lab_ptr, alab_ptr, blab_ptr,
    lse2_ptr, coef_ptr, coefpos_ptr, dq_ptr,  # dq: (splits, N, D) fp32 partials
    N, A, M, D, stride_f, stride_a, stride_b, qk_scale, split_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    row_lab = tl.load(lab_ptr + rows, mask=row_mask, other=0)
    lse2 = tl.load(lse2_ptr + rows, mask=row_mask, other=1e30)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    coef_pos = tl.load(coefpos_ptr + rows, mask=row_mask, other=0.0)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_mask = offs_do < D

    lo = pid_s * split_len
    hi = lo + split_len
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    start = tl.minimum(lo, N)
    stop = tl.minimum(hi, N)
    acc = _dq_scan(f_ptr, stride_f, rows, row_mask, row_lab, lse2, coef, coef_pos,
                   f_ptr, stride_f, lab_ptr, start, stop, D, qk_scale, acc, offs_do, do_mask,
                   True, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    start = tl.minimum(tl.maximum(lo - N, 0), A)
    stop = tl.minimum(tl.maximum(hi - N, 0), A)
    acc = _dq_scan(f_ptr, stride_f, rows, row_mask, row_lab, lse2, coef, coef_pos,
                   a_ptr, stride_a, alab_ptr, start, stop, D, qk_scale, acc, offs_do, do_mask,
                   False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    start = tl.minimum(tl.maximum(lo - N - A, 0), M)
    stop = tl.minimum(tl.maximum(hi - N - A, 0), M)
    acc = _dq_scan(f_ptr, stride_f, rows, row_mask, row_lab, lse2, coef, coef_pos,
                   b_ptr, stride_b, blab_ptr, start, stop, D, qk_scale, acc, offs_do, do_mask,
                   False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)

    out = dq_ptr + (pid_s * N + rows).to(tl.int64)[:, None] * D + offs_do[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & do_mask[None, :])


@triton.jit
def _supcon_bwd_dk_kernel(
    f_ptr, a_ptr, lab_ptr, alab_ptr, lse2_ptr, coef_ptr, coefpos_ptr,
    dk_ptr,  # (N + A, D) fp32, indexed by virtual key column
    N, A, D, stride_f, stride_a, col_start, col_stop, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = col_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < col_stop
    in_f = col_mask & (cols < N)   # batch keys: feats[cols]
    in_a = col_mask & (cols >= N)  # anchor keys: anchors[cols - N]
    col_lab = tl.where(in_f, tl.load(lab_ptr + cols, mask=in_f, other=0),
                       tl.load(alab_ptr + (cols - N), mask=in_a, other=0))
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_mask = offs_do < D
    kf_base = f_ptr + cols.to(tl.int64)[:, None] * stride_f
    ka_base = a_ptr + (cols - N).to(tl.int64)[:, None] * stride_a

    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        q_base = f_ptr + rows.to(tl.int64)[:, None] * stride_f
        s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed logits: keys × rows
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            k = tl.load(kf_base + dd[None, :], mask=in_f[:, None] & d_mask[None, :], other=0.0)
            k += tl.load(ka_base + dd[None, :], mask=in_a[:, None] & d_mask[None, :], other=0.0)
            q = tl.load(q_base + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            s = tl.dot(k, tl.trans(q), s, input_precision=DOT_PREC)
        s = s * qk_scale
        row_lab = tl.load(lab_ptr + rows, mask=row_mask, other=0)
        lse2 = tl.load(lse2_ptr + rows, mask=row_mask, other=1e30)
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        coef_pos = tl.load(coefpos_ptr + rows, mask=row_mask, other=0.0)
        valid = col_mask[:, None] & row_mask[None, :] & (cols[:, None] != rows[None, :])
        pos = valid & (col_lab[:, None] == row_lab[None, :])
        p = tl.where(valid, tl.exp2(tl.where(valid, s, 0.0) - lse2[None, :]), 0.0)
        g = coef[None, :] * p - tl.where(pos, coef_pos[None, :], 0.0)
        qo = tl.load(q_base + offs_do[None, :], mask=row_mask[:, None] & do_mask[None, :],
                     other=0.0)
        acc = tl.dot(g.to(qo.dtype), qo, acc, input_precision=DOT_PREC)

    out = dk_ptr + cols.to(tl.int64)[:, None] * D + offs_do[None, :]
    tl.store(out, acc, mask=col_mask[:, None] & do_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_d: int    # contraction slice of D for the logit tiles
    block_do: int   # output-feature slice of D held by one backward program
    warps_fwd: int
    warps_bwd: int
    stages: int


def _config(d: int, dtype: torch.dtype, on_gpu: bool, aligned: bool) -> _Config:
    """Tile sizes: checked free of register spills with ptxas for sm_90 (D = 7 … 1024), not
    autotuned on hardware.

    16-bit inputs run on tensor cores (wgmma on Hopper): 64×64 logit tiles reduced over 64-wide
    slices of D, 256 output features per backward program (3 slices for D = 768). fp32 inputs
    use exact IEEE dots on CUDA cores, whose operands live in registers, so their slices are
    narrower. ``aligned`` (D and row strides multiples of 16, as for 512/768/1024) lets Triton
    vectorise loads; otherwise every element carries its own address and narrower slices keep
    the pointers in registers.
    """
    if not on_gpu:  # TRITON_INTERPRET=1: small tiles, so tests cover multi-block/-slice paths
        return _Config(16, 16, 16, 16, 1, 1, 1)
    p2 = max(16, triton.next_power_of_2(d))
    if dtype != torch.float32 and aligned:
        bd, bdo, warps_fwd = 64, 256, 4
    elif dtype != torch.float32:
        bd, bdo, warps_fwd = 32, 128, 8
    elif aligned:
        bd, bdo, warps_fwd = 32, 128, 8
    else:
        bd, bdo, warps_fwd = 16, 128, 8
    return _Config(block_m=64, block_n=64, block_d=min(bd, p2), block_do=min(bdo, p2),
                   warps_fwd=warps_fwd, warps_bwd=8, stages=2)


def _aligned(*xs: torch.Tensor) -> bool:
    return all(x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 for x in xs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _key_splits(n_programs: int, n_keys: int, block_n: int, device: torch.device,
                forced: Optional[int]) -> int:
    """How many slices to cut the key range into (flash-decoding split-K).

    Enough to give every SM about two programs when N alone leaves the GPU idle, but never a
    slice shorter than 8 key blocks. 1 under the interpreter unless ``forced``.
    """
    if forced is not None:
        return max(1, min(int(forced), triton.cdiv(n_keys, block_n)))
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if n_programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, n_programs), triton.cdiv(n_keys, 8 * block_n), 64))


def _split_len(n_keys: int, splits: int, block_n: int) -> tuple[int, int]:
    length = triton.cdiv(triton.cdiv(n_keys, splits), block_n) * block_n
    return length, triton.cdiv(n_keys, length)


# --------------------------------------------------------------------------------------------
# autograd.Function
# --------------------------------------------------------------------------------------------


class SupConBankLossFunction(torch.autograd.Function):
    """Fused SupCon over batch ∪ anchors ∪ bank; gradients for feats and anchors only."""

    @staticmethod
    def forward(ctx, feats, anchors, bank, labels, anchor_labels, bank_labels, temperature,
                key_splits):
        n, d = feats.shape
        a, m = anchors.shape[0], bank.shape[0]
        on_gpu = feats.device.type == "cuda"
        cfg = _config(d, feats.dtype, on_gpu, _aligned(feats, anchors, bank))
        prec = "ieee" if feats.dtype == torch.float32 else None  # None: the target default
        qk_scale = _LOG2E / temperature
        n_keys = n + a + m
        grid_m = triton.cdiv(n, cfg.block_m)
        splits = _key_splits(grid_m, n_keys, cfg.block_n, feats.device, key_splits)
        split_len, splits = _split_len(n_keys, splits, cfg.block_n)

        # empty sources get a valid (never dereferenced) pointer
        a_src = anchors if a > 0 else feats
        b_src = bank if m > 0 else feats
        alab = anchor_labels if a > 0 else labels
        blab = bank_labels if m > 0 else labels

        part_lse = torch.empty((splits, n), dtype=torch.float32, device=feats.device)
        part_pos = torch.empty_like(part_lse)
        part_npos = torch.empty((splits, n), dtype=torch.int32, device=feats.device)
        _supcon_fwd_kernel[(grid_m, splits)](
            feats, a_src, b_src, labels, alab, blab, part_lse, part_pos, part_npos,
            n, a, m, d, feats.stride(0), a_src.stride(0), b_src.stride(0), qk_scale, split_len,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PREC=prec,
            num_warps=cfg.warps_fwd, num_stages=cfg.stages)
        if splits == 1:
            lse, pos_sum, n_pos = part_lse[0], part_pos[0], part_npos[0]
        else:
            lse = torch.logsumexp(part_lse, 0)
            pos_sum, n_pos = part_pos.sum(0), part_npos.sum(0)

        has_pos = n_pos > 0
        n_valid = has_pos.sum()
        row_loss = torch.where(has_pos, lse - pos_sum / n_pos.clamp_min(1), 0.0)
        loss = torch.where(n_valid > 0, row_loss.sum() / n_valid.clamp_min(1), 0.0)

        ctx.save_for_backward(feats, anchors, bank, labels, anchor_labels, bank_labels,
                              lse, n_pos)
        ctx.temperature = temperature
        ctx.key_splits = key_splits
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        feats, anchors, bank, labels, anchor_labels, bank_labels, lse, n_pos = ctx.saved_tensors
        need_f, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = feats.shape
        a, m = anchors.shape[0], bank.shape[0]
        if not (need_f or need_a):
            return (None,) * 8
        dev = feats.device
        on_gpu = dev.type == "cuda"
        cfg = _config(d, feats.dtype, on_gpu, _aligned(feats, anchors, bank))
        prec = "ieee" if feats.dtype == torch.float32 else None  # None: the target default
        inv_tau = 1.0 / ctx.temperature
        qk_scale = _LOG2E * inv_tau

        # per-row factors: dL/dlogit_ij · (1/τ) = coef_i · softmax_ij − coef_pos_i · pos_ij
        has_pos = n_pos > 0
        n_valid = has_pos.sum().clamp_min(1)
        coef = torch.where(has_pos, grad_out.float() * inv_tau / n_valid, 0.0).float().contiguous()
        coef_pos = (coef / n_pos.clamp_min(1)).contiguous()
        lse2 = torch.where(has_pos, lse * _LOG2E, _NO_ROW).float().contiguous()

        a_src = anchors if a > 0 else feats
        b_src = bank if m > 0 else feats
        alab = anchor_labels if a > 0 else labels
        blab = bank_labels if m > 0 else labels
        grid_do = triton.cdiv(d, cfg.block_do)

        grad_feats = grad_anchors = None
        if need_f:
            n_keys = n + a + m
            grid_m = triton.cdiv(n, cfg.block_m)
            splits = _key_splits(grid_m * grid_do, n_keys, cfg.block_n, dev, ctx.key_splits)
            split_len, splits = _split_len(n_keys, splits, cfg.block_n)
            dq = torch.empty((splits, n, d), dtype=torch.float32, device=dev)
            _supcon_bwd_dq_kernel[(grid_m, grid_do, splits)](
                feats, a_src, b_src, labels, alab, blab, lse2, coef, coef_pos, dq,
                n, a, m, d, feats.stride(0), a_src.stride(0), b_src.stride(0), qk_scale,
                split_len,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                BLOCK_DO=cfg.block_do, DOT_PREC=prec,
                num_warps=cfg.warps_bwd, num_stages=cfg.stages)
            grad_feats = dq[0] if splits == 1 else dq.sum(0)

        col_start = 0 if need_f else n
        col_stop = n + a if need_a else n
        dk = torch.empty((n + a, d), dtype=torch.float32, device=dev)
        if col_stop > col_start:
            _supcon_bwd_dk_kernel[(triton.cdiv(col_stop - col_start, cfg.block_n), grid_do)](
                feats, a_src, labels, alab, lse2, coef, coef_pos, dk,
                n, a, d, feats.stride(0), a_src.stride(0), col_start, col_stop, qk_scale,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                BLOCK_DO=cfg.block_do, DOT_PREC=prec,
                num_warps=cfg.warps_bwd, num_stages=cfg.stages)
        if need_f:
            grad_feats = (grad_feats + dk[:n]).to(feats.dtype)
        if need_a:
            grad_anchors = dk[n:].to(anchors.dtype)
        return grad_feats, grad_anchors, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def supcon_bank_loss_triton(
    feats: torch.Tensor,
    labels: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    temperature: float,
    *,
    key_splits: Optional[int] = None,
) -> torch.Tensor:
    """Fused-kernel twin of ``supcon_bank_loss_reference`` (same arguments, same result).

    Tensors must share one device (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``feats`` is
    float32, bfloat16 or float16. The returned loss is fp32; ``feats`` and ``anchors`` receive
    gradients in their own dtypes; ``bank_feats`` is treated as detached. ``key_splits``
    overrides the split-K heuristic (tests use it to cover splits that straddle sources).
    """
    if feats.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"supcon_bank_loss_triton: feats must be one of {SUPPORTED_DTYPES}, "
                        f"got {feats.dtype} (use the reference for other dtypes)")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dev = feats.device
    for name, t in (("labels", labels), ("bank_feats", bank_feats), ("bank_labels", bank_labels),
                    ("anchors", anchors), ("anchor_labels", anchor_labels)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, feats on {dev}")
    n = feats.shape[0]
    if n == 0:  # no rows: the reference's "no positives" zero, attached to the graph
        return (feats.sum() + anchors.sum()).float() * 0.0
    dtype = feats.dtype
    # ``.to`` is differentiable: the anchors' gradient comes back in their own dtype
    return SupConBankLossFunction.apply(
        _rows(feats, dtype),
        _rows(anchors, dtype),
        _rows(bank_feats.detach(), dtype),
        labels.to(torch.int64).contiguous(),
        anchor_labels.to(torch.int64).contiguous(),
        bank_labels.to(torch.int64).contiguous(),
        float(temperature),
        key_splits,
    )

