r"""One-program forward and backward of the memory-bank SupCon loss for small problems.

Same loss as :mod:`aigid.kernels.supcon_bank` (see its docstring and
:func:`aigid.kernels.reference.supcon_bank_loss_reference`): queries are the N batch rows
``feats``; keys are the virtual concatenation [feats; anchors; bank]; l_ij = q_i·k_j/τ; self
is excluded; positives share row i's int64 label. At MiraGe's sizes (N = 32, A = 2, M = 64)
the tiled path spends more time in its 3 launches and ~40 small torch ops than in arithmetic,
so this path does each direction in ONE Triton program (grid ``(1,)``): no torch epilogue, no
host sync (nothing calls ``.item()``; ``grad_out`` is read through its pointer; N_valid is
counted in-kernel), so a training step using it can be captured in a CUDA graph. The only host
work is ``torch.empty`` for the outputs.

Design. Everything fits in one CTA's registers while N ≤ 64, A ≤ 16, M ≤ 128:

* fp32 logit tiles, one per key source, each source read through its own pointer (no
  ``torch.cat``): S_b = Q·Qᵀ (BLOCK_M²), S_a = Q·Aᵀ (BLOCK_M×BLOCK_A) and the bank as one or
  two BLOCK_B-key tiles S_m = Q·Bankᵀ (two 64-key tiles where one 128-key tile would spill),
  reduced over D in masked BLOCK_D slices (any D, odd too). The Q slice is loaded once per
  step and feeds every dot (it is both operands of S_b).
* Forward: the tiles are folded one after another into base-2 row statistics (online max /
  log-sum-exp, as flash-attention merges key blocks, so only one tile's masks are live at a
  time), positive sums and counts; then the per-row loss and its mean over rows with
  positives, all in registers. Stores ``loss`` (0-dim fp32), ``lse2`` (lse·log2 e; 1e30 for
  rows without positives, so the backward's exp2(s − lse2) is an exact 0 there) and
  ``n_pos`` (int32).
* Backward: recompute the tiles, form G = g·w_i·(softmax − pos/n_pos)/τ (1/τ folded in), cast
  G to the input dtype (as flash-attention casts P), then sweep D in BLOCK_DO output slices:
  grad_feats = (G_b + G_bᵀ)·Q + G_a·A + G_m·Bank (queries and batch keys share Q, so the two
  batch terms fold into one dot) and grad_anchors = G_aᵀ·Q, accumulated in fp32 registers and
  stored once in the input dtype. ``NEED_F`` / ``NEED_A`` are constexpr, so a skipped output
  costs nothing.

Tiles are powers of two ≥ 16 (``tl.dot``'s minimum), masked to the real sizes; an empty
anchor/bank source is replaced by ``feats`` as a never-dereferenced pointer (all its loads are
masked off). On GPU BLOCK_M is always 64 so the 16-bit dots use wgmma on sm_90a (which needs
M % 64 == 0); fp32 inputs use IEEE dots (no TF32), as the tiled kernel does. Warps, slices and
bank tiling were picked with ptxas so both kernels compile for sm_90a and sm_80 without
register spills at the limits and at MiraGe's shape (D = 768); see ``_config`` for the few
bytes unaligned D costs on sm_80.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["SMALL_MAX_ROWS", "SMALL_MAX_ANCHORS", "SMALL_MAX_BANK", "SMALL_MAX_BANK_UNALIGNED",
           "small_fits",
           "small_forward", "small_backward"]

SMALL_MAX_ROWS = 64
SMALL_MAX_ANCHORS = 16
SMALL_MAX_BANK = 128
# D not a multiple of 16 (no vectorised loads): two 64-key bank tiles spill on sm_80 (56 B at
# N = 32, M = 128, fp16 D = 1000; compile report), so such shapes take one tile at most
SMALL_MAX_BANK_UNALIGNED = 64

_LOG2E = 1.4426950408889634


def small_fits(n: int, a: int, m: int, d: int) -> bool:
    """Whether the one-program path handles this shape (any D ≥ 1; N ≥ 1; A, M may be 0; M up
    to ``SMALL_MAX_BANK``, or ``SMALL_MAX_BANK_UNALIGNED`` when D is not a multiple of 16)."""
    max_bank = SMALL_MAX_BANK if d % 16 == 0 else SMALL_MAX_BANK_UNALIGNED
    return (1 <= n <= SMALL_MAX_ROWS and 0 <= a <= SMALL_MAX_ANCHORS
            and 0 <= m <= max_bank and d >= 1)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, stride, rows, n_rows, dd, d_mask):
    """x[rows, dd] (rows ≥ n_rows and dd ≥ D read as 0, never dereferenced)."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + dd[None, :],
                   mask=(rows < n_rows)[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _tiles(f_ptr, a_ptr, b_ptr, stride_f, stride_a, stride_b, N, A, M, D, qk_scale,
           BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
           BANK_TILES: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Base-2 fp32 logit tiles (l·log2 e): batch keys, anchors, bank keys [0, BLOCK_B) and,
    when BANK_TILES == 2, bank keys [BLOCK_B, 2·BLOCK_B) (else an unused zero tile)."""
    rows = tl.arange(0, BLOCK_M)
    ra = tl.arange(0, BLOCK_A)
    rb = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    s_b = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    s_a = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
    s_m = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    s_m2 = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dm = dd < D
        q = _load_rows(f_ptr, stride_f, rows, N, dd, dm)  # both operands of the batch tile
        ka = _load_rows(a_ptr, stride_a, ra, A, dd, dm)
        kb = _load_rows(b_ptr, stride_b, rb, M, dd, dm)
        s_b = tl.dot(q, tl.trans(q), s_b, input_precision=DOT_PREC)
        s_a = tl.dot(q, tl.trans(ka), s_a, input_precision=DOT_PREC)
        s_m = tl.dot(q, tl.trans(kb), s_m, input_precision=DOT_PREC)
        if BANK_TILES == 2:
            kb2 = _load_rows(b_ptr, stride_b, BLOCK_B + rb, M, dd, dm)
            s_m2 = tl.dot(q, tl.trans(kb2), s_m2, input_precision=DOT_PREC)
    return s_b * qk_scale, s_a * qk_scale, s_m * qk_scale, s_m2 * qk_scale


@triton.jit
def _masks(row_lab, N, klab_ptr, K, COL0: tl.constexpr, IS_BATCH: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(valid, positive) masks of the tile of keys [COL0, COL0 + BLOCK_K) of one source: real
    rows and keys, self excluded on the batch tile. Built per tile where it is used, so only
    one tile's masks (and int64 key labels) are live at a time."""
    rows = tl.arange(0, BLOCK_M)
    cols = COL0 + tl.arange(0, BLOCK_K)
    valid = (rows < N)[:, None] & (cols < K)[None, :]
    if IS_BATCH:
        valid = valid & (rows[:, None] != cols[None, :])
    klab = tl.load(klab_ptr + cols, mask=cols < K, other=0)
    return valid, valid & (row_lab[:, None] == klab[None, :])


@triton.jit
def online_fold(m_i, l_i, pos_sum, n_pos, s, valid, pos):
    """Fold one base-2 logit tile into running row statistics: flash-attention's online
    log-sum-exp (max m_i, rescaled sum l_i), the positive-logit sum and the positive count.
    Shared with the tiled forward in ``supcon_bank``."""
    s_m = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s_m, 1))
    # rows with no valid key so far keep m = -inf: subtract 0 there, not -inf (no NaN)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s_m - m_safe[:, None]), 1)
    pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
    n_pos += tl.sum(pos.to(tl.int32), 1)
    return m_new, l_i, pos_sum, n_pos


@triton.jit
def _fold(m_i, l_i, pos_sum, n_pos, s, row_lab, N, klab_ptr, K, COL0: tl.constexpr,
          IS_BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fold one source's tile (masks from its labels) into the running row statistics."""
    valid, pos = _masks(row_lab, N, klab_ptr, K, COL0, IS_BATCH, BLOCK_M, BLOCK_K)
    return online_fold(m_i, l_i, pos_sum, n_pos, s, valid, pos)


@triton.jit
def _small_fwd_kernel(
    f_ptr, a_ptr, b_ptr, lab_ptr, alab_ptr, blab_ptr,
    loss_ptr, lse2_ptr, npos_ptr,
    N, A, M, D, stride_f, stride_a, stride_b, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    BANK_TILES: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    row_lab = tl.load(lab_ptr + rows, mask=rows < N, other=0)
    s_b, s_a, s_m, s_m2 = _tiles(f_ptr, a_ptr, b_ptr, stride_f, stride_a, stride_b, N, A, M, D,
                                 qk_scale, BLOCK_M, BLOCK_A, BLOCK_B, BANK_TILES, BLOCK_D,
                                 DOT_PREC)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_pos = tl.zeros((BLOCK_M,), dtype=tl.int32)
    m, l, pos_sum, n_pos = _fold(m, l, pos_sum, n_pos, s_b, row_lab, N, lab_ptr, N, 0, True,
                                 BLOCK_M, BLOCK_M)
    m, l, pos_sum, n_pos = _fold(m, l, pos_sum, n_pos, s_a, row_lab, N, alab_ptr, A, 0, False,
                                 BLOCK_M, BLOCK_A)
    m, l, pos_sum, n_pos = _fold(m, l, pos_sum, n_pos, s_m, row_lab, N, blab_ptr, M, 0, False,
                                 BLOCK_M, BLOCK_B)
    if BANK_TILES == 2:
        m, l, pos_sum, n_pos = _fold(m, l, pos_sum, n_pos, s_m2, row_lab, N, blab_ptr, M,
                                     BLOCK_B, False, BLOCK_M, BLOCK_B)

    has_pos = n_pos > 0
    # a positive is a valid key, so m is finite and l ≥ 1 on rows with positives; the guards
    # only keep the other rows' (discarded) values finite
    lse2 = tl.where(has_pos, m, 0.0) + tl.log2(tl.where(has_pos, l, 1.0))
    row_loss = tl.where(has_pos, lse2 - pos_sum / tl.maximum(n_pos, 1).to(tl.float32), 0.0)
    n_valid = tl.sum(has_pos.to(tl.int32), 0)
    # every row_loss is 0 when n_valid == 0, so max(·, 1) yields the required exact 0
    loss = tl.sum(row_loss, 0) * 0.6931471805599453 / tl.maximum(n_valid, 1).to(tl.float32)

    tl.store(lse2_ptr + rows, tl.where(has_pos, lse2, 1e30), mask=rows < N)
    tl.store(npos_ptr + rows, n_pos, mask=rows < N)
    tl.store(loss_ptr, loss)


@triton.jit
def _grad_tile(s, row_lab, N, klab_ptr, K, lse2, coef, coef_pos, COL0: tl.constexpr,
               IS_BATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """G = coef·softmax − coef_pos·pos on one tile (coef = g·w/τ, coef_pos = coef/n_pos)."""
    valid, pos = _masks(row_lab, N, klab_ptr, K, COL0, IS_BATCH, BLOCK_M, BLOCK_K)
    p = tl.where(valid, tl.exp2(tl.where(valid, s, 0.0) - lse2[:, None]), 0.0)
    return coef[:, None] * p - tl.where(pos, coef_pos[:, None], 0.0)


@triton.jit
def _small_bwd_kernel(
    f_ptr, a_ptr, b_ptr, lab_ptr, alab_ptr, blab_ptr, lse2_ptr, npos_ptr, gout_ptr,
    df_ptr, da_ptr,  # (N, D) and (A, D), contiguous, feats' dtype
    N, A, M, D, stride_f, stride_a, stride_b, qk_scale, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    BANK_TILES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_PREC: tl.constexpr, NEED_F: tl.constexpr, NEED_A: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    ra = tl.arange(0, BLOCK_A)
    rb = tl.arange(0, BLOCK_B)
    row_mask = rows < N
    row_lab = tl.load(lab_ptr + rows, mask=row_mask, other=0)
    lse2 = tl.load(lse2_ptr + rows, mask=row_mask, other=1e30)
    n_pos = tl.load(npos_ptr + rows, mask=row_mask, other=0)
    has_pos = n_pos > 0
    n_valid = tl.maximum(tl.sum(has_pos.to(tl.int32), 0), 1).to(tl.float32)
    g = tl.load(gout_ptr).to(tl.float32)  # upstream grad through its pointer: no host sync
    coef = tl.where(has_pos, g * inv_tau / n_valid, 0.0)
    coef_pos = coef / tl.maximum(n_pos, 1).to(tl.float32)

    s_b, s_a, s_m, s_m2 = _tiles(f_ptr, a_ptr, b_ptr, stride_f, stride_a, stride_b, N, A, M, D,
                                 qk_scale, BLOCK_M, BLOCK_A, BLOCK_B, BANK_TILES, BLOCK_D,
                                 DOT_PREC)
    dtype = f_ptr.dtype.element_ty
    # G tiles are cast to the input dtype for the tensor-core dots, as flash-attention casts P
    g_a = _grad_tile(s_a, row_lab, N, alab_ptr, A, lse2, coef, coef_pos, 0, False,
                     BLOCK_M, BLOCK_A)
    if NEED_A:
        g_at = tl.trans(g_a).to(dtype)
    if NEED_F:
        g_a = g_a.to(dtype)
        g_b = _grad_tile(s_b, row_lab, N, lab_ptr, N, lse2, coef, coef_pos, 0, True,
                         BLOCK_M, BLOCK_M)
        # feats are queries (G_b·Q) and batch keys (G_bᵀ·Q): one dot on the fp32 sum
        g_sym = (g_b + tl.trans(g_b)).to(dtype)
        g_m = _grad_tile(s_m, row_lab, N, blab_ptr, M, lse2, coef, coef_pos, 0, False,
                         BLOCK_M, BLOCK_B).to(dtype)
        if BANK_TILES == 2:
            g_m2 = _grad_tile(s_m2, row_lab, N, blab_ptr, M, lse2, coef, coef_pos, BLOCK_B,
                              False, BLOCK_M, BLOCK_B).to(dtype)

    offs_do = tl.arange(0, BLOCK_DO)
    for d0 in range(0, D, BLOCK_DO):
        dd = d0 + offs_do
        dm = dd < D
        q = _load_rows(f_ptr, stride_f, rows, N, dd, dm)
        if NEED_F:
            acc = tl.dot(g_sym, q, input_precision=DOT_PREC)
            acc = tl.dot(g_a, _load_rows(a_ptr, stride_a, ra, A, dd, dm), acc,
                         input_precision=DOT_PREC)
            acc = tl.dot(g_m, _load_rows(b_ptr, stride_b, rb, M, dd, dm), acc,
                         input_precision=DOT_PREC)
            if BANK_TILES == 2:
                acc = tl.dot(g_m2, _load_rows(b_ptr, stride_b, BLOCK_B + rb, M, dd, dm), acc,
                             input_precision=DOT_PREC)
            tl.store(df_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], acc.to(dtype),
                     mask=row_mask[:, None] & dm[None, :])
        if NEED_A:
            acc_a = tl.dot(g_at, q, input_precision=DOT_PREC)
            tl.store(da_ptr + ra.to(tl.int64)[:, None] * D + dd[None, :], acc_a.to(dtype),
                     mask=(ra < A)[:, None] & dm[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration and entry points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_a: int
    block_b: int     # keys per bank tile
    bank_tiles: int  # 1 or 2 bank tiles
    block_d: int     # contraction slice of D for the logit tiles
    block_do: int    # output-feature slice of D in the backward
    warps: int
    stages: int = 1  # software-pipelining depth of the D loops


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _config(n: int, a: int, m: int, d: int, dtype: torch.dtype, on_gpu: bool,
            aligned: bool = True) -> _Config:
    """Tile sizes, checked with ptxas for sm_90a and sm_80 (``GPUTarget`` 90 / 80) at the limits,
    at MiraGe's shape and at D = 7 / 33 / 1000; not autotuned on hardware.

    * 16-bit, ``aligned`` (D and row strides multiples of 16, as for D = 768): 32-wide D slices
      for the logits, 128-wide output slices, one bank tile of up to 128 keys (wgmma n128),
      loads pipelined 2 deep. Spill-free on both targets (sm_80's forward sits at 255
      registers: mma.sync puts all 8 warps along M for these chained dots, so each warp pair
      holds the same rows).
    * 16-bit, unaligned (D = 1000, 33): no vectorised loads, so every element carries its own
      address and mask; 16/32-wide slices and 64-key bank tiles. Two of them spilled 56 bytes
      in sm_80's forward, so ``small_fits`` caps M at ``SMALL_MAX_BANK_UNALIGNED`` = 64 here:
      spill-free on both targets.
    * fp32: IEEE dots run on CUDA cores, whose operands are loaded whole along K into
      registers (a 64×128 tile alone needs ~246 registers at 8 warps), so 16-wide slices, two
      64-key bank tiles (never smaller: a 16-key tile for a small or empty bank spilled 8
      bytes in the backward) and no pipelining (2 stages spill). Spill-free at the limits, at
      MiraGe's shape and with an empty bank.

    8 warps throughout (4 spill everywhere). BLOCK_M = 64 always, since wgmma needs
    M % 64 == 0 (N ≤ 64 by ``small_fits``). Under the interpreter: the smallest row/anchor
    tiles and 16-wide D slices, so tests with D = 33 / 40 cover multi-slice loops and masked
    tails, with the same bank tiling as on GPU (two tiles for fp32 beyond 64 keys).
    """
    wide = dtype != torch.float32 and aligned
    block_b = min(_p2(m), 128 if wide else 64)
    bank_tiles = 2 if m > block_b else 1
    if not on_gpu:
        return _Config(_p2(n), _p2(a), block_b, bank_tiles, 16, 16, 4)
    if dtype == torch.float32:
        bd, bdo, stages = 16, 16, 1
        # a bank tile under 64 keys (M < 64, an empty bank too) spills 8 B in the fp32 backward
        # on both targets; the full 64-key tile does not (compile report)
        block_b = max(block_b, 64)
    elif aligned:
        bd, bdo, stages = 32, 128, 2
    else:
        bd, bdo, stages = 16, 32, 2
    p2d = _p2(d)
    return _Config(64, 16, block_b, bank_tiles, min(bd, p2d), min(bdo, p2d), 8, stages)


def _aligned(*xs: Tensor) -> bool:
    return all(x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 for x in xs)


def _sources(feats: Tensor, anchors: Tensor, bank: Tensor, labels: Tensor,
             anchor_labels: Tensor, bank_labels: Tensor):
    """Empty sources get feats/labels as stand-in pointers (never dereferenced: masked)."""
    a_src, alab = (anchors, anchor_labels) if anchors.shape[0] > 0 else (feats, labels)
    b_src, blab = (bank, bank_labels) if bank.shape[0] > 0 else (feats, labels)
    return a_src, b_src, alab, blab


def _dot_prec(dtype: torch.dtype) -> Optional[str]:
    return "ieee" if dtype == torch.float32 else None  # None: the target's default


def small_forward(feats: Tensor, anchors: Tensor, bank: Tensor, labels: Tensor,
                  anchor_labels: Tensor, bank_labels: Tensor, temperature: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One launch: (loss 0-dim fp32, lse2 (N,) fp32, n_pos (N,) int32). See module docstring
    for the lse2 convention; shapes must satisfy :func:`small_fits`."""
    n, d = feats.shape
    a, m = anchors.shape[0], bank.shape[0]
    a_src, b_src, alab, blab = _sources(feats, anchors, bank, labels, anchor_labels, bank_labels)
    cfg = _config(n, a, m, d, feats.dtype, feats.device.type == "cuda",
                  _aligned(feats, a_src, b_src))
    loss = torch.empty((), dtype=torch.float32, device=feats.device)
    lse2 = torch.empty((n,), dtype=torch.float32, device=feats.device)
    n_pos = torch.empty((n,), dtype=torch.int32, device=feats.device)
    _small_fwd_kernel[(1,)](
        feats, a_src, b_src, labels, alab, blab, loss, lse2, n_pos,
        n, a, m, d, feats.stride(0), a_src.stride(0), b_src.stride(0), _LOG2E / temperature,
        BLOCK_M=cfg.block_m, BLOCK_A=cfg.block_a, BLOCK_B=cfg.block_b,
        BANK_TILES=cfg.bank_tiles, BLOCK_D=cfg.block_d,
        DOT_PREC=_dot_prec(feats.dtype), num_warps=cfg.warps, num_stages=cfg.stages)
    return loss, lse2, n_pos


def small_backward(feats: Tensor, anchors: Tensor, bank: Tensor, labels: Tensor,
                   anchor_labels: Tensor, bank_labels: Tensor, lse2: Tensor, n_pos: Tensor,
                   grad_out: Tensor, temperature: float, need_feats: bool, need_anchors: bool
                   ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """One launch (none if neither gradient is needed): (grad_feats, grad_anchors) in
    feats.dtype, None for the ones not asked for. ``grad_out`` is a 0-dim tensor, read by the
    kernel (no host sync)."""
    if not (need_feats or need_anchors):
        return None, None
    n, d = feats.shape
    a, m = anchors.shape[0], bank.shape[0]
    a_src, b_src, alab, blab = _sources(feats, anchors, bank, labels, anchor_labels, bank_labels)
    cfg = _config(n, a, m, d, feats.dtype, feats.device.type == "cuda",
                  _aligned(feats, a_src, b_src))
    grad_feats = torch.empty((n, d), dtype=feats.dtype, device=feats.device) if need_feats else None
    grad_anchors = (torch.empty((a, d), dtype=feats.dtype, device=feats.device)
                    if need_anchors else None)
    _small_bwd_kernel[(1,)](
        feats, a_src, b_src, labels, alab, blab, lse2, n_pos, grad_out,
        # outputs not asked for (or empty) get feats as a stand-in pointer: NEED_* / masks
        # keep every store off it
        grad_feats if need_feats else feats, grad_anchors if need_anchors and a > 0 else feats,
        n, a, m, d, feats.stride(0), a_src.stride(0), b_src.stride(0),
        _LOG2E / temperature, 1.0 / temperature,
        BLOCK_M=cfg.block_m, BLOCK_A=cfg.block_a, BLOCK_B=cfg.block_b,
        BANK_TILES=cfg.bank_tiles, BLOCK_D=cfg.block_d,
        BLOCK_DO=cfg.block_do, DOT_PREC=_dot_prec(feats.dtype),
        NEED_F=need_feats, NEED_A=need_anchors, num_warps=cfg.warps, num_stages=cfg.stages)
    return grad_feats, grad_anchors
