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
    GPU busy when N is small and the bank is large; splits are sized so the grid comes close to
    one whole wave, ``_key_splits``); a tiny torch epilogue merges the splits
    (``logsumexp`` over splits) and forms the loss
        L = mean_{i: n_pos_i > 0} (lse_i - pos_sum_i / n_pos_i),
    0 when no row has a positive (still attached to the graph; all gradients are then 0).

Backward: with w_i = 1/N_valid for rows with positives (0 otherwise) and g the upstream scalar,
    G_ij = dL/dl_ij · (1/τ) = g · w_i · (softmax_ij - pos_ij / n_pos_i) / τ,
    dq_i = Σ_j G_ij · k_j      (every key: batch, anchors, bank)
    dk_j = Σ_i G_ij · q_i      (only batch and anchor keys: the bank is detached).
    ``grad_feats = dq + dk[:N]`` (feats are queries *and* keys), ``grad_anchors = dk[N:]``.

    ``_supcon_bwd_weights_kernel``, grid ``(cdiv(N, BLOCK_M), cdiv(chunk, BLOCK_N))``, writes G
    for one chunk of key columns of one source into an (N, chunk) buffer in the input dtype
    (bf16 on tensor cores, as flash-attention stores P), recomputing each logit exactly once
    from the saved per-row lse; the two per-row factors g·w_i/τ and g·w_i/(τ·n_pos_i) are O(N)
    vectors. Then dq += G·K_chunk and, for batch / anchor chunks, dk_chunk = Gᵀ·Q are plain
    GEMMs (cuBLAS on CUDA, fp32 results). Why not fused as flash-attention's dq/dk passes:
    a D-wide dq accumulator (D = 768) does not fit in registers, so a fused pass must split D
    over programs and recompute the logits once per split (3× at D = 768, plus a second
    recompute for dk); here the tensor cores do the logits once and the two gradient products
    once, i.e. executed MMA ≈ useful MMA. Every tile is independent, so the grid fills the GPU
    at any N with no split-K and no atomics (deterministic). Memory: the chunk width keeps the
    G buffer no larger than the inputs, (N + keys)·D elements, so the pass stays O((N + M)·D);
    the bank is visited only when feats need a gradient.

    Neither pass waits on the host (no ``.item()``).

Precision: tiles are loaded in the input dtype (bf16/fp16 go to tensor cores), every dot
accumulates in fp32, fp32 inputs use IEEE fp32 dots (no TF32) so they match the reference to
~1e-6; softmax weights are cast to the key dtype before the gradient dot, as flash-attention
does. The loss is fp32; gradients come back in the dtypes of ``feats`` and ``anchors``.
Anchors and bank are cast to ``feats.dtype`` first, as the reference does.

Block sizes are fixed heuristics (``_config``), proven free of register spills for sm_90a and
sm_80 by ``benchmarks/compile_report.py`` but not autotuned on hardware; under
``TRITON_INTERPRET=1`` (CPU tests) small 16-wide blocks exercise every tiling path. Labels are
compared as int64, so any integer ids work.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .supcon_small import online_fold, small_backward, small_fits, small_forward

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
        m_i, l_i, pos_sum, n_pos = online_fold(m_i, l_i, pos_sum, n_pos, s, valid, pos)
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
def _supcon_bwd_weights_kernel(
    q_ptr, k_ptr, lab_ptr, klab_ptr, lse2_ptr, coef_ptr, coefpos_ptr,
    g_ptr,  # (N, chunk) in the input dtype: dL/dlogit · (1/τ) for keys k0 … k0 + n_cols
    N, D, stride_q, stride_k, stride_g, k0, n_cols, qk_scale,
    IS_BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of the gradient weights G_ij = coef_i·p_ij − coef_pos_i·pos_ij
    for keys ``k_ptr[k0 + j]`` of one source: each logit is recomputed exactly once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column of the G chunk
    col_mask = cols < n_cols
    keys = k0 + cols                                 # row of the key source
    s = _logit_tile(q_ptr, stride_q, rows, row_mask, k_ptr, stride_k, keys, col_mask, D,
                    BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC) * qk_scale
    valid = row_mask[:, None] & col_mask[None, :]
    if IS_BATCH:
        valid = valid & (rows[:, None] != keys[None, :])
    row_lab = tl.load(lab_ptr + rows, mask=row_mask, other=0)
    klab = tl.load(klab_ptr + keys, mask=col_mask, other=0)
    pos = valid & (row_lab[:, None] == klab[None, :])
    lse2 = tl.load(lse2_ptr + rows, mask=row_mask, other=1e30)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    coef_pos = tl.load(coefpos_ptr + rows, mask=row_mask, other=0.0)
    p = tl.where(valid, tl.exp2(tl.where(valid, s, 0.0) - lse2[:, None]), 0.0)
    g = coef[:, None] * p - tl.where(pos, coef_pos[:, None], 0.0)
    out = g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(out, g.to(g_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    fwd_m: int      # query rows per forward program
    fwd_n: int      # key columns per forward step
    bwd_m: int      # rows of one gradient-weight tile
    bwd_n: int      # columns of one gradient-weight tile
    block_d: int    # contraction slice of D for the logit tiles
    warps_fwd: int
    warps_bwd: int
    stages: int


def _config(d: int, dtype: torch.dtype, on_gpu: bool, aligned: bool) -> _Config:
    """Tile sizes, proven free of register spills and within shared memory for sm_90a and sm_80
    by ``benchmarks/compile_report.py`` (D = 7 … 1024); not yet autotuned on hardware.

    16-bit inputs run on tensor cores (wgmma on Hopper). The forward keeps a 128-row query tile
    (half the key traffic of 64 rows) against 64-key steps; the gradient-weight tiles are
    128×128 (pure GEMM-plus-epilogue tiles, like a matmul's). Both reduce over 64-wide slices of
    D. fp32 inputs use exact IEEE dots on CUDA cores, whose operands live in registers, so
    their tiles and slices are smaller. ``aligned`` (D and row strides multiples of 16, as for
    512/768/1024) lets Triton vectorise loads; otherwise every element carries its own address
    and narrower slices keep the pointers in registers.
    """
    if not on_gpu:  # TRITON_INTERPRET=1: small tiles, so tests cover multi-block/-slice paths
        return _Config(16, 16, 16, 16, 16, 1, 1, 1)
    p2 = max(16, triton.next_power_of_2(d))
    if dtype != torch.float32:
        bd = 64 if aligned else 32
        return _Config(fwd_m=128, fwd_n=64, bwd_m=128, bwd_n=128, block_d=min(bd, p2),
                       warps_fwd=8, warps_bwd=8, stages=2)
    bd = 32 if aligned else 16
    return _Config(fwd_m=64, fwd_n=64, bwd_m=64, bwd_n=64, block_d=min(bd, p2),
                   warps_fwd=8, warps_bwd=8, stages=2)


def _aligned(*xs: torch.Tensor) -> bool:
    return all(x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 for x in xs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# CTAs of the forward kernel that fit on one SM at the 16-bit / fp32 configs above (registers
# and shared memory, as benchmarks/compile_report.py computes them for sm_90a; a test there
# keeps these in step with the compiled kernel).
FWD_CTAS_PER_SM = {"16-bit": 1, "fp32": 1}


def _key_splits(n_programs: int, n_keys: int, block_n: int, device: torch.device,
                forced: Optional[int], ctas_per_sm: int) -> int:
    """How many slices to cut the key range into (flash-decoding split-K).

    When the row blocks alone fill less than half of one wave (SMs × CTAs per SM), cut the
    keys so the grid comes as close to one whole wave as it can without spilling into a
    second, partly idle one — never a slice shorter than 8 key blocks, never more than 64
    splits. 1 under the interpreter unless ``forced``.
    """
    if forced is not None:
        return max(1, min(int(forced), triton.cdiv(n_keys, block_n)))
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    slots = sms * ctas_per_sm
    if 2 * n_programs > slots:
        return 1
    return max(1, min(slots // n_programs, triton.cdiv(n_keys, 8 * block_n), 64))


def _split_len(n_keys: int, splits: int, block_n: int) -> tuple[int, int]:
    length = triton.cdiv(triton.cdiv(n_keys, splits), block_n) * block_n
    return length, triton.cdiv(n_keys, length)


def _bwd_chunk(n: int, n_keys: int, d: int, block_n: int, forced: Optional[int]) -> int:
    """Key columns per gradient-weight chunk: the (N, chunk) buffer holds no more elements than
    the inputs themselves, (N + keys)·D, so memory stays O((N + M)·D); chunks are balanced
    and a multiple of BLOCK_N. ``forced`` (tests) sets it directly."""
    if forced is not None:
        return max(1, int(forced))
    budget = max(block_n, (n + n_keys) * d // max(n, 1))
    pieces = triton.cdiv(n_keys, budget)
    return max(block_n, triton.cdiv(triton.cdiv(n_keys, pieces), block_n) * block_n)


@functools.lru_cache(maxsize=None)
def _mm_has_out_dtype(device_type: str) -> bool:
    """``torch.mm(..., out_dtype=float32)`` (16-bit operands, fp32 result) exists on CUDA in
    recent PyTorch; checked once per device type rather than assumed."""
    try:
        x = torch.zeros((2, 2), dtype=torch.bfloat16, device=device_type)
        torch.mm(x, x, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_f32(x: torch.Tensor, y: torch.Tensor,
            acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ y with fp32 accumulation *and* an fp32 result, so chunk partial sums are not rounded
    to 16 bits before they are added up; with ``acc`` (fp32), added into it in place (fp32
    inputs: one ``addmm_``, no temporary)."""
    if x.dtype == torch.float32:
        return torch.mm(x, y) if acc is None else acc.addmm_(x, y)
    if _mm_has_out_dtype(x.device.type):
        out = torch.mm(x, y, out_dtype=torch.float32)
        return out if acc is None else acc.add_(out)
    return torch.mm(x.float(), y.float()) if acc is None else acc.addmm_(x.float(), y.float())


# --------------------------------------------------------------------------------------------
# autograd.Function
# --------------------------------------------------------------------------------------------


class SupConBankLossFunction(torch.autograd.Function):
    """Fused SupCon over batch ∪ anchors ∪ bank; gradients for feats and anchors only."""

    @staticmethod
    def forward(ctx, feats, anchors, bank, labels, anchor_labels, bank_labels, temperature,
                key_splits, bwd_chunk, small):
        n, d = feats.shape
        a, m = anchors.shape[0], bank.shape[0]
        ctx.temperature = temperature
        ctx.bwd_chunk = bwd_chunk
        ctx.small = small
        if small:  # one program each way (supcon_small.py); lse2/n_pos are its own convention
            loss, lse2, n_pos = small_forward(feats, anchors, bank, labels, anchor_labels,
                                              bank_labels, temperature)
            ctx.save_for_backward(feats, anchors, bank, labels, anchor_labels, bank_labels,
                                  lse2, n_pos)
            return loss
        on_gpu = feats.device.type == "cuda"
        cfg = _config(d, feats.dtype, on_gpu, _aligned(feats, anchors, bank))
        prec = "ieee" if feats.dtype == torch.float32 else None  # None: the target default
        qk_scale = _LOG2E / temperature
        n_keys = n + a + m
        grid_m = triton.cdiv(n, cfg.fwd_m)
        occupancy = FWD_CTAS_PER_SM["fp32" if feats.dtype == torch.float32 else "16-bit"]
        splits = _key_splits(grid_m, n_keys, cfg.fwd_n, feats.device, key_splits, occupancy)
        split_len, splits = _split_len(n_keys, splits, cfg.fwd_n)

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
            BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=cfg.block_d, DOT_PREC=prec,
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
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        feats, anchors, bank, labels, anchor_labels, bank_labels, lse, n_pos = ctx.saved_tensors
        need_f, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = feats.shape
        a, m = anchors.shape[0], bank.shape[0]
        if not (need_f or need_a):
            return (None,) * 10
        if ctx.small:
            grad_feats, grad_anchors = small_backward(
                feats, anchors, bank, labels, anchor_labels, bank_labels, lse, n_pos, grad_out,
                ctx.temperature, need_f, need_a)  # in feats' dtype, which anchors share here
            return grad_feats, grad_anchors, None, None, None, None, None, None, None, None
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

        # G = dL/dlogit·(1/τ), one chunk of key columns at a time (O(N·chunk) memory), each
        # logit recomputed once; G·K (dq) and Gᵀ·Q (dk) are plain GEMMs (cuBLAS on CUDA).
        chunk = _bwd_chunk(n, a + m + n, d, cfg.bwd_n, ctx.bwd_chunk)
        g_buf = torch.empty((n, chunk), dtype=feats.dtype, device=dev)
        grad_feats = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_f else None
        grad_anchors = torch.empty((a, d), dtype=torch.float32, device=dev) if need_a else None
        sources = []  # (keys, their labels, is the batch itself)
        if need_f:
            sources.append((feats, labels, True))
        if a > 0:
            sources.append((anchors, anchor_labels, False))
        if need_f and m > 0:
            sources.append((bank, bank_labels, False))
        for keys, key_labels, is_batch in sources:
            rows = keys.shape[0]
            for k0 in range(0, rows, chunk):
                width = min(chunk, rows - k0)
                _supcon_bwd_weights_kernel[(triton.cdiv(n, cfg.bwd_m),
                                            triton.cdiv(width, cfg.bwd_n))](
                    feats, keys, labels, key_labels, lse2, coef, coef_pos, g_buf,
                    n, d, feats.stride(0), keys.stride(0), g_buf.stride(0), k0, width, qk_scale,
                    IS_BATCH=is_batch, BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n,
                    BLOCK_D=cfg.block_d, DOT_PREC=prec,
                    num_warps=cfg.warps_bwd, num_stages=cfg.stages)
                g = g_buf[:, :width]
                if need_f:  # dq: every key
                    _mm_f32(g, keys[k0:k0 + width], acc=grad_feats)
                if is_batch:  # feats are keys too
                    _mm_f32(g.t(), feats, acc=grad_feats[k0:k0 + width])
                elif keys is anchors and need_a:
                    grad_anchors[k0:k0 + width] = _mm_f32(g.t(), feats)
        if need_f:
            grad_feats = grad_feats.to(feats.dtype)
        if need_a:
            grad_anchors = grad_anchors.to(anchors.dtype)
        return grad_feats, grad_anchors, None, None, None, None, None, None, None, None


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
    bwd_chunk: Optional[int] = None,
    path: str = "auto",
) -> torch.Tensor:
    """Fused-kernel twin of ``supcon_bank_loss_reference`` (same arguments, same result).

    Tensors must share one device (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``feats`` is
    float32, bfloat16 or float16. The returned loss is fp32; ``feats`` and ``anchors`` receive
    gradients in their own dtypes; ``bank_feats`` is treated as detached. ``key_splits``
    overrides the split-K heuristic (tests use it to cover splits that straddle sources);
    ``bwd_chunk`` the backward's key-chunk width (tests use it to cover several chunks).
    ``path``: "small" runs the one-program forward and backward of ``supcon_small`` (N ≤ 64,
    A ≤ 16, M ≤ 128: MiraGe's defaults; one launch each way, no host sync, CUDA-graph safe),
    "tiled" the kernels above; "auto" takes "small" on CUDA when the shape fits.
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
    if path not in ("auto", "tiled", "small"):
        raise ValueError(f"path must be 'auto', 'tiled' or 'small', got {path!r}")
    if n == 0:  # no rows: the reference's "no positives" zero, attached to the graph
        return (feats.sum() + anchors.sum()).float() * 0.0
    fits = small_fits(n, anchors.shape[0], bank_feats.shape[0], feats.shape[1])
    if path == "small" and not fits:
        raise ValueError(f"path='small' takes N ≤ 64, A ≤ 16, M ≤ 128 (64 when D is not a "
                         f"multiple of 16); got N={n}, "
                         f"A={anchors.shape[0]}, M={bank_feats.shape[0]}")
    small = path == "small" or (path == "auto" and fits and dev.type == "cuda")
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
        bwd_chunk,
        small,
    )

