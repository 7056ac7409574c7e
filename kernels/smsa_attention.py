"""Fused SMSA attention: non-causal attention of one query stream over several K/V sources.

UniGenDet's SMSA lets the detection tokens' queries read the keys/values of several streams
([generation latents; detection; text]). The plain way concatenates the sources and calls SDPA;
this kernel reads every source in place from its own pointer (up to ``MAX_SOURCES``), so there is
no ``torch.cat`` copy, no GQA ``repeat_interleave`` and no ``L_q × ΣL_s`` matrix, forward or
backward. Ground truth: ``aigid.kernels.reference.smsa_attention_reference``.

Shapes: q (B, H_q, L_q, d); source s: k_s, v_s (B, H_kv, L_s, d) with H_q = G·H_kv (query head h
reads key/value head h // G, as ``repeat_interleave`` does); optional valid key lengths (B,) per
source: keys at positions ≥ lengths[s][b] are ignored and their key blocks are never loaded. A
batch row with no valid key in any source gets a zero output (and zero gradients).

Design (flash-attention 2 style, written from its published algorithm):

* Masking: per source, the full key blocks run in an unmasked main loop and only the ragged tail
  block (valid length not a multiple of BLOCK_N) is masked, in the forward and in dQ. dK/dV owns
  one key block per program: it never masks keys inside its query loop and zeroes the invalid
  key rows once after it (row n of dK/dV depends on key n only).
* forward ``_fwd_kernel``, grid (⌈L_q/BLOCK_M⌉, B·H_q): one program keeps a Q block in registers
  and runs the online softmax over the valid key blocks of source 0, then 1, ... (scores in base 2,
  ``exp2``, fp32 accumulators); it stores O and the row log-sum-exp (base 2, of the scaled scores;
  +inf for rows without keys so that recomputed probabilities are exactly 0).
* backward ``_bwd_preprocess``: delta = rowsum(dO ∘ O), fp32, grid over query blocks.
* ``_bwd_dkdv_kernel``, grid (Σ_s ⌈L_s/BLOCK_N⌉, B·H_kv, SPLITS): one program owns one key
  block of one source and one KV head; it loops over query heads g ≡ pid_s (mod SPLITS) of its
  GQA group and over all query blocks, recomputing P = exp2(QKᵀ·c − lse) and accumulating
  dV += Pᵀ dO, dK += dSᵀ Q in fp32 registers. With SPLITS = 1 (the default whenever the grid
  already fills the GPU) the whole GQA reduction happens in-kernel and every dK/dV element is
  written by exactly one program. Without the split, UniGenDet's sizes (G = 7, ~132-156 key
  blocks × KV heads) launch about one wave of CTAs (one per SM at d = 128), each running 7
  heads serially; BLOCK_N is already the smallest wgmma tile, so the host (``_dkdv_splits``)
  splits the group instead, into the fewest programs that give ≥ 2 waves: each writes fp32
  partials of its heads to a (2, SPLITS, B, H_kv, ΣL_s, d) buffer that torch sums over the
  split axis and casts to the source dtype (deterministic, no atomics; memory cost in
  ``_backward``). Heads are interleaved (not contiguous ranges) over the splits: one strided
  loop serves any SPLITS ≤ G, balanced to within one head, and the heavier low splits are
  dispatched first. Key blocks past the valid length skip the loop and store zeros.
* ``_bwd_dq_kernel``, grid (⌈L_q/BLOCK_M⌉, B·H_q): dQ for one query block over all sources' valid
  key blocks. A separate kernel rather than atomics in the dK/dV pass: dQ stays deterministic,
  needs no fp32 scratch buffer nor a conversion pass, and atomics would contend across the G
  heads × all key blocks of every source that hit the same dQ rows. It costs one extra QKᵀ and
  dO Vᵀ recomputation, as in the Triton flash-attention tutorial.

Tiles: on CUDA each pass is autotuned over ``AUTOTUNE_CONFIGS[pass]``
(``candidate_configs(pass, d, capability)`` per head dim and GPU), pruned at launch to the tiles
that give ≥ 2 waves of CTAs when some do (see ``_prune``); with
``torch.use_deterministic_algorithms(True)`` the first kept pointer config runs untimed. Under
the CPU interpreter: one fixed ``INTERPRETER_CONFIG`` (``INTERPRETER_TMA_CONFIG`` when a test
forces TMA).

TMA (sm_90+): the tiles each pass streams through its inner loop — K and V in the forward and
dQ, Q and dO in dK/dV — can be read by the Hopper copy engine through host-side
``TensorDescriptor``s instead of per-thread pointer loads (Q/dO in the forward and dQ, and K/V
in dK/dV, are read once per program and stay pointer loads). What it changes: no per-element
address arithmetic or cp.async address registers (sm_90a compile report, d = 128 bf16:
forward 176 → 150 registers, dK/dV 249-255 → 221-227, dQ 152 → 139, no spills, the dots still
wgmma), and the copy engine moves each tile into swizzled shared memory on its own.

* One descriptor per tensor, rank 4 over the (B, H, L, d) view with the view's own strides and
  block [1, 1, rows, D], loaded at (b, head, row, 0) and reshaped to (rows, D). So strided views
  of a packed buffer are read in place as with pointers, and the zero fill of out-of-bounds
  rows stops at L of exactly that head (a 2-D (B·H·L, d) flattening would read the next
  head's rows and fits only contiguous tensors).
* The kernels are the same; the constexpr ``USE_TMA`` selects descriptor or pointer loads, and
  the descriptors travel as keyword arguments (``KD0``…``VD3``, ``QD``/``DOD``) that default
  to None, i.e. to constexpr None: a launch without them compiles to the pointer kernel of
  before (PTX identical modulo debug-line labels, checked against the previous module on every
  sm_80 and sm_90a launch of the compile report).
* Eligibility (host, ``tma_unsupported_reason``, per pass: the forward and dQ look at the
  non-empty K/V sources, dK/dV at q and dO; one ineligible tensor → pointers for that pass):
  ``AIGID_SMSA_TMA=0`` forces pointers; a CUDA device of capability ≥ 9.0, not the
  interpreter; each tensor fp16/bf16/fp32, rank ≤ 5, last dim contiguous, base address and
  every non-last stride multiples of 16 bytes (the stride of a size-1 dim, never stepped over,
  is replaced by a valid one), no broadcast (zero) stride, coordinates < 2^31. An empty source
  (L_s = 0, which a descriptor cannot describe) borrows another source's descriptors: it runs
  no key block, so they are never read.
* Ragged tails: rows ≥ L_s (≥ L_q for Q/dO) come back as zeros, as the masked pointer loads
  give; the valid-length masking is unchanged (-inf scores in the forward, P = 0 in dQ,
  dK/dV's row zeroing). With valid lengths the rows in [n_valid, L_s) of a tail block are real
  memory that may hold anything (NaN in an uninitialised cache), so the tail tile zeroes them
  in V (forward) and in K and V (dQ: 0 · NaN would reach dQ through dO·Vᵀ and dS·K): the
  result is that of the pointer path (bit-identical under the interpreter, fp32).
* Autotuning: every pointer config has a TMA twin (same tile, warps, stages; ``USE_TMA`` and a
  ``pre_hook`` that sets the descriptors' block shapes from BLOCK_M/BLOCK_N, as in Triton's
  fused-attention tutorial), appended after the pointer configs. ``candidate_configs`` offers
  the twins on sm_90+ only, ``_prune`` keeps them only for launches that carry descriptors
  (``TMA_OK``, which is also part of the autotune key), and the timing on the GPU chooses;
  deterministic mode keeps the first pointer config and launches it without descriptors.
  Caveat: the pointer configs timed next to the TMA ones do receive the (unused) descriptors:
  same instructions, a longer parameter list, and the launcher encodes their tensor maps on
  every launch (a host-side cost of microseconds). The twins take 1 KiB more shared memory
  (barriers); for the forward's 64×64 4-warp 3-stage tile that is the difference between two
  CTAs per SM (pointers) and one (TMA) on an H100.
* Unverified without a GPU (the interpreter checks the algorithm, the compile report the code's
  shape): whether TMA is faster here (the autotuner decides on the GPU), that the driver's
  tensor-map encoding accepts every eligible view (packed views have a head stride smaller
  than their row stride; no rule against that is known), the host cost of the encodings, and
  the compiled TMA kernels' results on hardware (``test_gpu_tma_path_matches_reference``,
  ``-m gpu``, forces them there with ``_FORCE_TMA``).

Head dims: powers of two from 16 to 128. Dtypes: fp16 and bf16 (fp32 accumulation) and fp32
(exact IEEE dots, used by the CPU interpreter tests).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["AUTOTUNE_CONFIGS", "INTERPRETER_CONFIG", "INTERPRETER_TMA_CONFIG", "MAX_SOURCES",
           "SUPPORTED_HEAD_DIMS", "SMSAAttentionFunction", "candidate_configs",
           "smsa_attention_triton", "tma_unsupported_reason", "unsupported_reason"]

MAX_SOURCES = 4
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _n_valid(LENS, s: tl.constexpr, B, off_b, L, HAS_LENS: tl.constexpr):
    """Valid key count of source ``s`` for batch row ``off_b`` (lengths pre-clamped to [0, L])."""
    if HAS_LENS:
        n = tl.load(LENS + s * B + off_b)
    else:
        n = L
    return n


@triton.jit
def _kv_tile(base, desc, ob, oh, start_n, n_valid, stride, offs_n, offs_d,
             MASKED: tl.constexpr, ZERO_TAIL: tl.constexpr, USE_TMA: tl.constexpr,
             BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Rows [start_n, start_n + BLOCK_N) of one head of a K or V source, (BLOCK_N, D).

    Pointers: ``base`` is the head's first row; a MASKED (tail) block reads rows ≥ n_valid as 0.
    TMA: ``desc`` is the source's rank-4 (B, H_kv, L_s, d) descriptor with block
    [1, 1, BLOCK_N, D], read at head (ob, oh); the copy engine zero-fills rows ≥ L_s, and
    ZERO_TAIL (valid lengths given: rows in [n_valid, L_s) are real memory that may hold
    anything, NaN included) zeroes rows ≥ n_valid of a MASKED block so the tile equals the
    pointer path's."""
    if USE_TMA:
        x = desc.load([ob, oh, start_n, 0]).reshape(BLOCK_N, D)
        if MASKED and ZERO_TAIL:
            x = tl.where((start_n + offs_n < n_valid)[:, None], x, 0.0)
    else:
        cols = start_n + offs_n
        if MASKED:
            x = tl.load(base + cols[:, None] * stride + offs_d[None, :],
                        mask=(cols < n_valid)[:, None], other=0.0)
        else:
            x = tl.load(base + cols[:, None] * stride + offs_d[None, :])
    return x


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, skl, svl, start_n, n_valid, qk_scale, offs_n,
               offs_d, kd, vd, ob, oh, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
               HAS_LENS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
               D: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N); only a source's tail block
    is MASKED (bounds checks on the loads, -inf on the scores). With TMA the tail's K rows past
    the valid length are not zeroed: their scores are replaced by -inf whatever they hold."""
    k = _kv_tile(k_base, kd, ob, oh, start_n, n_valid, skl, offs_n, offs_d, MASKED, False,
                 USE_TMA, BLOCK_N, D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where((start_n + offs_n < n_valid)[None, :], qk, float("-inf"))
    # Every block visited holds at least one valid key, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _kv_tile(v_base, vd, ob, oh, start_n, n_valid, svl, offs_n, offs_d, MASKED, HAS_LENS,
                 USE_TMA, BLOCK_N, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _pair_bases(X, Y, sxb, sxh, syb, syh, off_b, off_h, USE_TMA: tl.constexpr):
    """Where a (batch, head) row of two tensors starts: pointers offset to it, or (TMA) the
    untouched descriptors plus the (batch, head) coordinates their loads take."""
    if USE_TMA:
        x_base = X
        y_base = Y
        ob = off_b.to(tl.int32)
        oh = off_h.to(tl.int32)
    else:
        x_base = X + off_b * sxb + off_h * sxh
        y_base = Y + off_b * syb + off_h * syh
        ob = 0
        oh = 0
    return x_base, y_base, ob, oh


@triton.jit
def _fwd_source(acc, m_i, l_i, q, K, V, skb, skh, skl, svb, svh, svl, off_b, off_hkv, n_valid,
                qk_scale, offs_n, offs_d, kd, vd,
                BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, HAS_LENS: tl.constexpr,
                USE_TMA: tl.constexpr, D: tl.constexpr):
    # Full key blocks run unmasked; at most one ragged tail block per source is masked (the
    # split of the Triton fused-attention tutorial's off-band/on-band stages and of the
    # n_full_blocks/masked_blocks loops in flash-attention's AMD Triton kernel).
    k_base, v_base, ob, oh = _pair_bases(K, V, skb, skh, svb, svh, off_b, off_hkv, USE_TMA)
    n_full = n_valid - n_valid % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skl, svl, start_n, n_valid,
                                   qk_scale, offs_n, offs_d, kd, vd, ob, oh, False, DOT_PREC,
                                   HAS_LENS, USE_TMA, BLOCK_N, D)
    if n_full < n_valid:
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skl, svl, n_full, n_valid,
                                   qk_scale, offs_n, offs_d, kd, vd, ob, oh, True, DOT_PREC,
                                   HAS_LENS, USE_TMA, BLOCK_N, D)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, Out, LSE, LENS,
    K0, V0, K1, V1, K2, V2, K3, V3,
    sqb, sqh, sql, sob, soh, sol,
    sk0b, sk0h, sk0l, sv0b, sv0h, sv0l,
    sk1b, sk1h, sk1l, sv1b, sv1h, sv1l,
    sk2b, sk2h, sk2l, sv2b, sv2h, sv2l,
    sk3b, sk3h, sk3l, sv3b, sv3h, sv3l,
    L0, L1, L2, L3,
    B, H_q, L_q, GROUP, qk_scale,
    NUM_SOURCES: tl.constexpr, HAS_LENS: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    KD0=None, VD0=None, KD1=None, VD1=None, KD2=None, VD2=None, KD3=None, VD3=None,
    TMA_OK: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    # KD*/VD*: the sources' TMA descriptors when the host found them eligible (TMA_OK), else
    # None; only a USE_TMA config reads them (see _kv_tile).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_q).to(tl.int64)
    off_h = (pid_bh % H_q).to(tl.int64)
    off_hkv = off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L_q

    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    n0 = _n_valid(LENS, 0, B, off_b, L0, HAS_LENS)
    acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, K0, V0, sk0b, sk0h, sk0l, sv0b, sv0h, sv0l,
                                off_b, off_hkv, n0, qk_scale, offs_n, offs_d, KD0, VD0,
                                BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)
    if NUM_SOURCES > 1:
        n1 = _n_valid(LENS, 1, B, off_b, L1, HAS_LENS)
        acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, K1, V1, sk1b, sk1h, sk1l, sv1b, sv1h, sv1l,
                                    off_b, off_hkv, n1, qk_scale, offs_n, offs_d, KD1, VD1,
                                    BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)
    if NUM_SOURCES > 2:
        n2 = _n_valid(LENS, 2, B, off_b, L2, HAS_LENS)
        acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, K2, V2, sk2b, sk2h, sk2l, sv2b, sv2h, sv2l,
                                    off_b, off_hkv, n2, qk_scale, offs_n, offs_d, KD2, VD2,
                                    BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)
    if NUM_SOURCES > 3:
        n3 = _n_valid(LENS, 3, B, off_b, L3, HAS_LENS)
        acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, K3, V3, sk3b, sk3h, sk3l, sv3b, sv3h, sv3l,
                                    off_b, off_hkv, n3, qk_scale, offs_n, offs_d, KD3, VD3,
                                    BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows without keys: acc == 0 -> 0
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(Out + off_b * sob + off_h * soh + offs_m[:, None] * sol + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * L_q + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(Out, DO, Delta, sob, soh, sol, sdb, sdh, sdl, H_q, L_q,
                    D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_q).to(tl.int64)
    off_h = (pid_bh % H_q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L_q
    o = tl.load(Out + off_b * sob + off_h * soh + offs_m[:, None] * sol + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdl + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * L_q + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, skl, svl, start_n, n_valid, qk_scale, offs_n,
              offs_d, kd, vd, ob, oh, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
              HAS_LENS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
              D: tl.constexpr):
    # With TMA and valid lengths, a tail's K and V rows past the valid length are zeroed (P is
    # masked to 0 there, but 0 · NaN in dO·Vᵀ or dS·K would not be 0).
    k = _kv_tile(k_base, kd, ob, oh, start_n, n_valid, skl, offs_n, offs_d, MASKED, HAS_LENS,
                 USE_TMA, BLOCK_N, D)
    v = _kv_tile(v_base, vd, ob, oh, start_n, n_valid, svl, offs_n, offs_d, MASKED, HAS_LENS,
                 USE_TMA, BLOCK_N, D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        p = tl.where((start_n + offs_n < n_valid)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_source(dq, q, do, lse, delta, K, V, skb, skh, skl, svb, svh, svl, off_b, off_hkv, n_valid,
               qk_scale, offs_n, offs_d, kd, vd, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
               HAS_LENS: tl.constexpr, USE_TMA: tl.constexpr, D: tl.constexpr):
    # Unmasked main loop over full key blocks, one masked tail block (as in _fwd_source).
    k_base, v_base, ob, oh = _pair_bases(K, V, skb, skh, svb, svh, off_b, off_hkv, USE_TMA)
    n_full = n_valid - n_valid % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skl, svl, start_n, n_valid, qk_scale,
                       offs_n, offs_d, kd, vd, ob, oh, False, DOT_PREC, HAS_LENS, USE_TMA,
                       BLOCK_N, D)
    if n_full < n_valid:
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skl, svl, n_full, n_valid, qk_scale,
                       offs_n, offs_d, kd, vd, ob, oh, True, DOT_PREC, HAS_LENS, USE_TMA,
                       BLOCK_N, D)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, DO, DQ, LSE, Delta, LENS,
    K0, V0, K1, V1, K2, V2, K3, V3,
    sqb, sqh, sql, sdb, sdh, sdl, sgb, sgh, sgl,
    sk0b, sk0h, sk0l, sv0b, sv0h, sv0l,
    sk1b, sk1h, sk1l, sv1b, sv1h, sv1l,
    sk2b, sk2h, sk2l, sv2b, sv2h, sv2l,
    sk3b, sk3h, sk3l, sv3b, sv3h, sv3l,
    L0, L1, L2, L3,
    B, H_q, L_q, GROUP, sm_scale, qk_scale,
    NUM_SOURCES: tl.constexpr, HAS_LENS: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    KD0=None, VD0=None, KD1=None, VD1=None, KD2=None, VD2=None, KD3=None, VD3=None,
    TMA_OK: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    # K/V descriptors as in _fwd_kernel. Q and dO are read once per program: pointers.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_q).to(tl.int64)
    off_h = (pid_bh % H_q).to(tl.int64)
    off_hkv = off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L_q

    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdl + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    row_base = pid_bh.to(tl.int64) * L_q
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    n0 = _n_valid(LENS, 0, B, off_b, L0, HAS_LENS)
    dq = _dq_source(dq, q, do, lse, delta, K0, V0, sk0b, sk0h, sk0l, sv0b, sv0h, sv0l,
                    off_b, off_hkv, n0, qk_scale, offs_n, offs_d, KD0, VD0,
                    BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)
    if NUM_SOURCES > 1:
        n1 = _n_valid(LENS, 1, B, off_b, L1, HAS_LENS)
        dq = _dq_source(dq, q, do, lse, delta, K1, V1, sk1b, sk1h, sk1l, sv1b, sv1h, sv1l,
                        off_b, off_hkv, n1, qk_scale, offs_n, offs_d, KD1, VD1,
                        BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)
    if NUM_SOURCES > 2:
        n2 = _n_valid(LENS, 2, B, off_b, L2, HAS_LENS)
        dq = _dq_source(dq, q, do, lse, delta, K2, V2, sk2b, sk2h, sk2l, sv2b, sv2h, sv2l,
                        off_b, off_hkv, n2, qk_scale, offs_n, offs_d, KD2, VD2,
                        BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)
    if NUM_SOURCES > 3:
        n3 = _n_valid(LENS, 3, B, off_b, L3, HAS_LENS)
        dq = _dq_source(dq, q, do, lse, delta, K3, V3, sk3b, sk3h, sk3l, sv3b, sv3h, sv3l,
                        off_b, off_hkv, n3, qk_scale, offs_n, offs_d, KD3, VD3,
                        BLOCK_N, DOT_PREC, HAS_LENS, USE_TMA, D)

    dq = dq * sm_scale
    tl.store(DQ + off_b * sgb + off_h * sgh + offs_m[:, None] * sgl + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sql, sdl, start_m, L_q,
               qk_scale, offs_m, offs_d, qd, dod, ob, oh, DOT_PREC: tl.constexpr,
               USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """dK/dV contribution of queries [start_m, start_m + BLOCK_M). Rows past L_q load
    q = dO = 0 (masked pointer loads, or the zero fill of the rank-4 (B, H_q, L_q, d) Q/dO
    descriptors read at head (ob, oh) under USE_TMA) and lse = +inf, so their P and dS are
    exactly 0."""
    rows = start_m + offs_m
    row_ok = rows < L_q
    if USE_TMA:
        q = qd.load([ob, oh, start_m, 0]).reshape(BLOCK_M, D)
        do = dod.load([ob, oh, start_m, 0]).reshape(BLOCK_M, D)
    else:
        q = tl.load(q_base + rows[:, None] * sql + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        do = tl.load(do_base + rows[:, None] * sdl + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (N, M)
    p_t = tl.math.exp2(qk_t - lse[None, :])
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_block(Q, DO, LSE, Delta, K, V, DK, DV,
                sqb, sqh, sql, sdb, sdh, sdl,
                skb, skh, skl, svb, svh, svl, sgb, sgh, sgl,
                off_b, off_hkv, start_n, L, n_valid, H_q, L_q, GROUP, pid_s, sgs,
                sm_scale, qk_scale, qd, dod, SPLITS: tl.constexpr,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """dK/dV of key block [start_n, start_n + BLOCK_N) from query heads g ≡ pid_s (mod SPLITS)
    of KV head ``off_hkv``'s group: stored into the gradients themselves when SPLITS == 1
    (pid_s, sgs unused), else as this split's fp32 partial at ``DK/DV + slot·sgs`` (summed over
    the slots on the host)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < n_valid
    k = tl.load(K + off_b * skb + off_hkv * skh + offs_n[:, None] * skl + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + off_b * svb + off_hkv * svh + offs_n[:, None] * svl + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # Keys are never masked inside the loop: row n of dK/dV depends only on key n, so the keys
    # past n_valid (tail block only) are zeroed once after it. The query side keeps its row
    # bounds on the loads (predicates, no work on the N×M tile): splitting that loop into a main
    # loop and a tail cost ptxas 128-384 B of spill on sm_90a at d = 128 (compile report). A key
    # block past the valid length reads no query and stores zeros.
    m_end = tl.where(start_n < n_valid, L_q, 0)
    # Heads interleaved over the splits (split s takes s, s + SPLITS, ...): one loop for any
    # SPLITS ≤ GROUP, balanced to within one head. SPLITS is a constexpr so that SPLITS == 1
    # compiles to the unsplit kernel exactly (no program_id(2), no split offset). The head
    # index is carried through the loop: its exit value lies in [GROUP, GROUP + SPLITS) and
    # differs between splits, so g - GROUP names this split's partial slot (a permutation of
    # pid_s) without keeping pid_s live across the loop (ptxas spilled it at 255 registers on
    # sm_90a, 64×64 tile).
    if SPLITS == 1:
        g = 0
    else:
        g = pid_s
    for _ in range(g, GROUP, SPLITS):
        off_h = off_hkv * GROUP + g
        q_base, do_base, ob, oh = _pair_bases(Q, DO, sqb, sqh, sdb, sdh, off_b, off_h, USE_TMA)
        row_base = (off_b * H_q + off_h) * L_q
        for start_m in range(0, m_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, LSE + row_base, Delta + row_base,
                                sql, sdl, start_m, L_q, qk_scale, offs_m, offs_d, qd, dod, ob, oh,
                                DOT_PREC, USE_TMA, BLOCK_M, D)
        g += SPLITS
    dk = tl.where(col_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(col_ok[:, None], dv, 0.0)
    store_ok = (offs_n < L)[:, None]
    out_off = off_b * sgb + off_hkv * sgh + offs_n[:, None] * sgl + offs_d[None, :]
    if SPLITS > 1:
        out_off += (g - GROUP).to(tl.int64) * sgs
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, DO, LSE, Delta, LENS,
    K0, V0, DK0, DV0, K1, V1, DK1, DV1, K2, V2, DK2, DV2, K3, V3, DK3, DV3,
    sqb, sqh, sql, sdb, sdh, sdl,
    sk0b, sk0h, sk0l, sv0b, sv0h, sv0l, sg0b, sg0h, sg0l,
    sk1b, sk1h, sk1l, sv1b, sv1h, sv1l, sg1b, sg1h, sg1l,
    sk2b, sk2h, sk2l, sv2b, sv2h, sv2l, sg2b, sg2h, sg2l,
    sk3b, sk3h, sk3l, sv3b, sv3h, sv3l, sg3b, sg3h, sg3l,
    L0, L1, L2, L3,
    B, H_q, H_kv, L_q, GROUP, sgs, sm_scale, qk_scale,
    NUM_SOURCES: tl.constexpr, HAS_LENS: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    QD=None, DOD=None, TMA_OK: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    # Flat grid over the key blocks of all sources: [0, END0) -> source 0, [END0, END1) -> 1, ...
    # The block counts are computed here, not passed in, because the autotuner picks BLOCK_N
    # after the arguments are fixed. Axis 2 splits the GQA group: program pid_s takes query
    # heads g ≡ pid_s (mod SPLITS) (see _dkdv_splits); sgs is the split stride of the fp32
    # partial buffer the DK*/DV* pointers then point into. QD/DOD: TMA descriptors of Q and dO
    # (streamed G·L_q rows per program, the loads TMA serves); K/V are read once per program
    # and stay pointer loads.
    END0 = tl.cdiv(L0, BLOCK_N)
    END1 = END0 + tl.cdiv(L1, BLOCK_N)
    END2 = END1 + tl.cdiv(L2, BLOCK_N)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = (pid_bh // H_kv).to(tl.int64)
    off_hkv = (pid_bh % H_kv).to(tl.int64)
    if pid < END0:
        n0 = _n_valid(LENS, 0, B, off_b, L0, HAS_LENS)
        _dkdv_block(Q, DO, LSE, Delta, K0, V0, DK0, DV0, sqb, sqh, sql, sdb, sdh, sdl,
                    sk0b, sk0h, sk0l, sv0b, sv0h, sv0l, sg0b, sg0h, sg0l,
                    off_b, off_hkv, pid * BLOCK_N, L0, n0, H_q, L_q, GROUP, pid_s, sgs,
                    sm_scale, qk_scale, QD, DOD, SPLITS, D, BLOCK_M, BLOCK_N, DOT_PREC,
                    USE_TMA)
    if NUM_SOURCES > 1:
        if (pid >= END0) & (pid < END1):
            n1 = _n_valid(LENS, 1, B, off_b, L1, HAS_LENS)
            _dkdv_block(Q, DO, LSE, Delta, K1, V1, DK1, DV1, sqb, sqh, sql, sdb, sdh, sdl,
                        sk1b, sk1h, sk1l, sv1b, sv1h, sv1l, sg1b, sg1h, sg1l,
                        off_b, off_hkv, (pid - END0) * BLOCK_N, L1, n1, H_q, L_q, GROUP,
                        pid_s, sgs, sm_scale, qk_scale, QD, DOD, SPLITS, D, BLOCK_M, BLOCK_N,
                        DOT_PREC, USE_TMA)
    if NUM_SOURCES > 2:
        if (pid >= END1) & (pid < END2):
            n2 = _n_valid(LENS, 2, B, off_b, L2, HAS_LENS)
            _dkdv_block(Q, DO, LSE, Delta, K2, V2, DK2, DV2, sqb, sqh, sql, sdb, sdh, sdl,
                        sk2b, sk2h, sk2l, sv2b, sv2h, sv2l, sg2b, sg2h, sg2l,
                        off_b, off_hkv, (pid - END1) * BLOCK_N, L2, n2, H_q, L_q, GROUP,
                        pid_s, sgs, sm_scale, qk_scale, QD, DOD, SPLITS, D, BLOCK_M, BLOCK_N,
                        DOT_PREC, USE_TMA)
    if NUM_SOURCES > 3:
        if pid >= END2:
            n3 = _n_valid(LENS, 3, B, off_b, L3, HAS_LENS)
            _dkdv_block(Q, DO, LSE, Delta, K3, V3, DK3, DV3, sqb, sqh, sql, sdb, sdh, sdl,
                        sk3b, sk3h, sk3l, sv3b, sv3h, sv3l, sg3b, sg3h, sg3l,
                        off_b, off_hkv, (pid - END2) * BLOCK_N, L3, n3, H_q, L_q, GROUP,
                        pid_s, sgs, sm_scale, qk_scale, QD, DOD, SPLITS, D, BLOCK_M, BLOCK_N,
                        DOT_PREC, USE_TMA)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _set_tma_block_shapes(nargs) -> None:
    """Config ``pre_hook`` of the TMA configs (the Triton fused-attention tutorial's pattern):
    give the host-side descriptors of this launch the block shape of the config about to run,
    [1, 1, BLOCK_N, D] for the K/V descriptors (forward, dQ), [1, 1, BLOCK_M, D] for Q/dO
    (dK/dV), so the autotuner can time different tiles over the same descriptor objects. The
    block shape is part of the kernel's specialisation (``tensordesc<bf16[1, 1, 64, 128]>``)."""
    d = nargs["D"]
    for name, rows in _TMA_DESC_ROWS.items():
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs[rows], d]


_TMA_DESC_ROWS = {**{f"{kv}D{i}": "BLOCK_N" for i in range(MAX_SOURCES) for kv in "KV"},
                  "QD": "BLOCK_M", "DOD": "BLOCK_M"}


def _config(block_m: int, block_n: int, warps: int, stages: int,
            tma: bool = False) -> triton.Config:
    if tma:
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": True},
                             num_warps=warps, num_stages=stages, pre_hook=_set_tma_block_shapes)
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


def _is_tma(cfg: triton.Config) -> bool:
    return bool(cfg.kwargs.get("USE_TMA", False))


# Autotune sets per pass (CUDA). BLOCK_M tiles queries, BLOCK_N keys. Every tile keeps the dim
# that becomes the MMA's M at ≥ 64 (BLOCK_M in forward and dQ, BLOCK_N in dK/dV), the smallest
# a Hopper warpgroup wgmma takes, so no config falls back to mma.sync on sm_90a. The first entry
# of each list is the tile the kernel used before autotuning (the largest that compiled with at
# most ~200 bytes of spill on sm_80 and sm_90a). Three stages need ≥ 160 KiB of shared memory
# per block (A100/H100); a config that does not fit is skipped by the autotuner
# (OutOfResources), so smaller GPUs keep the two-stage ones.
_POINTER_CONFIGS: dict[str, list[triton.Config]] = {
    "fwd": [_config(128, 64, 8, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3),
            _config(64, 64, 8, 3)],
    "dkdv": [_config(64, 64, 8, 2), _config(32, 128, 8, 3), _config(32, 64, 4, 2),
             _config(32, 64, 8, 2)],
    "dq": [_config(128, 32, 8, 3), _config(64, 32, 4, 3), _config(64, 64, 4, 2),
           _config(64, 32, 8, 3)],
}
# TMA twins of the pointer tiles (same tiles, warps and stages, USE_TMA and the block-shape
# pre_hook): tried only on sm_90+ and only for launches whose tensors the host found eligible
# (``_prune``), after the pointer configs, so that the pointer config stays first (the one
# deterministic mode runs). Which of the two wins is left to the autotuner's timing on the GPU.
_TMA_CONFIGS: dict[str, list[triton.Config]] = {
    kind: [_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, tma=True)
           for c in configs]
    for kind, configs in _POINTER_CONFIGS.items()
}
AUTOTUNE_CONFIGS: dict[str, list[triton.Config]] = {
    kind: _POINTER_CONFIGS[kind] + _TMA_CONFIGS[kind] for kind in _POINTER_CONFIGS
}
# Under the CPU interpreter: one fixed small tile, so tests are fast and deterministic and block
# edges fall inside the test lengths; its TMA twin runs when a test forces the TMA path.
INTERPRETER_CONFIG = _config(16, 16, 1, 1)
INTERPRETER_TMA_CONFIG = _config(16, 16, 1, 1, tma=True)
_PRE_BLOCK = {"interpreter": 16, "small_d": 128, "large_d": 64}  # delta = rowsum(dO∘O)
_DEFAULT_SMS = 132  # H100 SXM; the real count is read from the device when there is one
_MIN_WAVES = 2


def candidate_configs(kind: str, d: int, capability: int = 90) -> list[triton.Config]:
    """The CUDA configs of pass ``kind`` ("fwd", "dkdv", "dq") tried at head dim ``d`` on a GPU
    of compute capability ``capability`` (90 = sm_90a, 80 = sm_80), before the runtime
    grid-fill pruning: what an ahead-of-time compile report should compile for each case.

    Rules from the compile report (ptxas spills): the fp32 accumulators (BLOCK_M×d in forward
    and dQ, two BLOCK_N×d in dK/dV) may take at most 64 registers per thread; on sm_80 (mma.sync
    keeps its fragments in registers) d = 128 needs 8 warps, and dQ its 128-row tile (64 rows
    spilled 560-1112 B there). The TMA twins (``USE_TMA``) are candidates on sm_90+ only, under
    the same rules; whether a launch may use them (its tensors meet TMA's constraints, see
    ``tma_unsupported_reason``) is decided per launch by ``_prune``.
    """
    out = []
    for c in AUTOTUNE_CONFIGS[kind]:
        if _is_tma(c) and capability < 90:
            continue
        acc = 2 * c.kwargs["BLOCK_N"] * d if kind == "dkdv" else c.kwargs["BLOCK_M"] * d
        if acc > 64 * 32 * c.num_warps:
            continue
        if capability < 90 and d >= 128 and (c.num_warps < 8
                                              or (kind == "dq" and c.kwargs["BLOCK_M"] < 128)):
            continue
        out.append(c)
    return out


def _grid_ctas(kind: str, cfg: triton.Config, args: dict) -> int:
    """CTAs of pass ``kind``'s grid under ``cfg``; dK/dV's includes its GQA split (axis 2)."""
    if kind == "dkdv":
        block_n = cfg.kwargs["BLOCK_N"]
        n_blocks = sum(triton.cdiv(args[f"L{i}"], block_n) for i in range(MAX_SOURCES))
        return n_blocks * args["B"] * args["H_kv"] * args.get("SPLITS", 1)
    return triton.cdiv(args["L_q"], cfg.kwargs["BLOCK_M"]) * args["B"] * args["H_q"]


def _num_sms(tensor: torch.Tensor) -> int:
    if tensor.device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(tensor.device).multi_processor_count


def _capability(tensor: torch.Tensor) -> int:
    if tensor.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


def _prune(kind: str):
    """Early pruning for ``kind``: drop tiles the head dim cannot hold, then — when some tile
    gives at least ``_MIN_WAVES`` waves of CTAs — the tiles whose grid gives fewer.

    Why (UniGenDet: B = 1, H_q = 28, H_kv = 4, d = 128, H100 with 132 SMs; counting one CTA per
    SM, which is what a 128-row d = 128 tile with three stages leaves room for):
    forward and dQ launch 28·⌈L_q/BLOCK_M⌉ CTAs. At L_q = 1024, BLOCK_M = 128 gives 224 CTAs =
    1.70 waves, BLOCK_M = 64 gives 448 = 3.39 waves; both run ⌈waves⌉ rounds for a 15% idle tail
    at one CTA per SM, but 64-row tiles fit two per SM (half the shared memory), so 448 CTAs on
    264 slots. At L_q = 2048, 128 → 448 CTAs (3.39 waves, 15% tail), 64 → 896 (6.79 waves, 3%
    tail). At L_q = 4096, 128 → 896 CTAs already: every config stays and the timing decides.
    dK/dV launches Σ_s⌈L_s/BLOCK_N⌉·B·H_kv·SPLITS CTAs. Unsplit, each loops over G·L_q query
    rows, so its waves are few and long: ΣL_s = 2496 at BLOCK_N = 64 is 39·4 = 156 CTAs = 1.18
    waves (2 rounds of 7 heads each, 41% of the SM-time idle); sources (64, 1024, 1024) give
    33·4 = 132 = one wave of 7-head CTAs (1.22 waves on A100's 108 SMs). 64 is already the
    smallest wgmma-friendly BLOCK_N, so a smaller key tile cannot add CTAs; instead the host
    splits the GQA group over a third grid axis (``_dkdv_splits``: SPLITS programs per key
    block, each over G/SPLITS heads, summed afterwards) so that BLOCK_N = 64 gives ≥ 2 waves:
    SPLITS = 2 at both sizes (312 and 264 CTAs of ≤ 4 heads). SPLITS is fixed before the
    launch (the partial buffer is allocated for it), from the smallest candidate BLOCK_N, and
    the CTA count pruned on here includes it (``_grid_ctas``), so a 128-key tile, which halves
    the grid, is dropped when it falls under the two waves that 64 reaches. The autotuner then
    times what the pruning leaves.

    TMA: the ``USE_TMA`` twins are kept only when the launch carries descriptors (``TMA_OK``,
    set by the host on sm_90+ for eligible tensors); they have their pointer twin's grid, so
    the wave filter keeps or drops both alike, and a pointer config always comes first (the
    lists put the TMA twins last, and ``configs[:1]`` is a pointer config).
    """
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d = args["D"]
        fits = candidate_configs(kind, d, _capability(args["Q"]))
        if not args.get("TMA_OK", False):  # no descriptors passed: pointer configs only
            fits = [c for c in fits if not _is_tma(c)]
        configs = [c for c in configs if c in fits] or configs[:1]
        target = _MIN_WAVES * _num_sms(args["Q"])
        filling = [c for c in configs if _grid_ctas(kind, c, args) >= target]
        return filling or configs
    return prune


# Test/benchmark override of the dK/dV GQA split (None: ``_dkdv_splits`` decides). The CPU
# interpreter tests set it to run the split path, which the heuristic never picks there.
_FORCE_DKDV_SPLITS: Optional[int] = None


def _split_counts(group: int) -> list[int]:
    """The split counts worth trying for a GQA group of ``group`` heads, ascending: for each
    longest-program head count c = ⌈group/SPLITS⌉, the fewest splits giving it, ⌈group/c⌉.
    Every divisor of ``group`` is one; G = 7 gives 1, 2, 3, 4, 7 (5 and 6 would launch more
    CTAs and partials than 4 for the same 2-head critical path)."""
    return sorted({-(-group // c) for c in range(1, group + 1)})


def _dkdv_splits(q: torch.Tensor, lengths: Sequence[int], batch: int, h_kv: int, group: int,
                 forced: Optional[int] = None) -> int:
    """SPLITS for the dK/dV pass: how many programs share each (key block, batch row, KV head),
    program s taking query heads g ≡ s (mod SPLITS) of the group.

    The smallest of ``_split_counts(group)`` whose grid reaches ``_MIN_WAVES`` waves of CTAs
    (one CTA per SM, as ``_prune`` counts: the d = 128 tiles take 173-255 registers × 256
    threads, one CTA per SM on sm_80/sm_90a) at the smallest candidate BLOCK_N, else ``group``.
    BLOCK_N is the autotuner's choice, made after the partial buffer must exist, so SPLITS is
    fixed here from the tile that gives the most CTAs; ``_prune`` then reasons with the split
    grid. 1 under the CPU interpreter and for CPU tensors, unless ``forced`` (clamped to
    [1, group]) or ``_FORCE_DKDV_SPLITS`` says otherwise.

    Why ≥ 2 waves rather than as many CTAs as possible: every split beyond 1 costs fp32
    partials (SPLITS × 2 × ΣL_s × B·H_kv × d × 4 B) and a torch reduction over them, so the
    split stops as soon as the grid fills the GPU twice over. Caveat: at exactly one wave of
    equal CTAs (UniGenDet on 132 SMs) the rounds × heads-per-CTA product stays 7 (4 + 3 heads
    at SPLITS = 2); the gain there is on 108-SM A100s (1.22 → 2.44 waves, ~14 → ~10 head-rounds),
    at ΣL_s = 2496 (1.18 → 2.36 waves), and wherever CTAs are uneven (ragged lengths).
    """
    if forced is None:
        forced = _FORCE_DKDV_SPLITS
    if forced is not None:
        return max(1, min(int(forced), group))
    if group == 1 or _interpreting() or not q.is_cuda:
        return 1
    return _grid_fill_splits(lengths, batch, h_kv, group, q.shape[-1], _capability(q),
                             _num_sms(q))


def _grid_fill_splits(lengths: Sequence[int], batch: int, h_kv: int, group: int, d: int,
                      capability: int = 90, sms: int = _DEFAULT_SMS) -> int:
    """``_dkdv_splits``'s rule on a GPU with ``sms`` SMs (pure arithmetic, testable on CPU)."""
    configs = candidate_configs("dkdv", d, capability) or AUTOTUNE_CONFIGS["dkdv"]
    block_n = min(c.kwargs["BLOCK_N"] for c in configs)
    ctas = sum(triton.cdiv(n, block_n) for n in lengths) * batch * h_kv
    for splits in _split_counts(group):
        if ctas * splits >= _MIN_WAVES * sms:
            return splits
    return group


# TMA_OK is part of every key: a tile chosen for a launch with descriptors may be a TMA config,
# which a launch of the same sizes without them (misaligned views, AIGID_SMSA_TMA=0) cannot run.
_AUTOTUNE_KEYS = {
    "fwd": ["B", "H_q", "L_q", "L0", "L1", "L2", "L3", "D", "NUM_SOURCES", "HAS_LENS", "TMA_OK"],
    "dkdv": ["B", "H_q", "H_kv", "L_q", "L0", "L1", "L2", "L3", "SPLITS", "D", "NUM_SOURCES",
             "HAS_LENS", "TMA_OK"],
    "dq": ["B", "H_q", "L_q", "L0", "L1", "L2", "L3", "D", "NUM_SOURCES", "HAS_LENS", "TMA_OK"],
}


def _autotuned(kind: str, kernel):
    return triton.autotune(configs=AUTOTUNE_CONFIGS[kind], key=_AUTOTUNE_KEYS[kind],
                           prune_configs_by={"early_config_prune": _prune(kind)})(kernel)


_TUNED = {"fwd": _autotuned("fwd", _fwd_kernel), "dkdv": _autotuned("dkdv", _bwd_dkdv_kernel),
          "dq": _autotuned("dq", _bwd_dq_kernel)}
_RAW = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
_ARG_NAMES = {kind: fn.arg_names for kind, fn in _RAW.items()}


def _deterministic_config(kind: str, named: dict, kwargs: dict) -> triton.Config:
    """The config deterministic mode runs untimed: the first pointer config the pruning keeps
    (the TMA twins are never considered there, so the choice is the one made before them)."""
    return _prune(kind)(_POINTER_CONFIGS[kind], named, **kwargs)[0]


def _fixed_config_kwargs(cfg: triton.Config, named: dict, kwargs: dict) -> dict:
    """Keyword arguments of a launch of ``cfg`` outside the autotuner: a pointer config gets no
    descriptors (nor TMA_OK), i.e. exactly the kernel of a launch without them; a TMA config's
    ``pre_hook`` sets its descriptors' block shapes, as the autotuner would before running it."""
    if not _is_tma(cfg):
        return {k: v for k, v in kwargs.items() if k not in _TMA_DESC_ROWS and k != "TMA_OK"}
    if cfg.pre_hook is not None:
        cfg.pre_hook({**named, **kwargs, **cfg.all_kwargs()})
    return kwargs


def _launch(kind: str, grid, *args, **kwargs) -> None:
    """Launch pass ``kind``: the fixed interpreter tile on CPU, the autotuned set on CUDA.

    ``grid`` maps the chosen config's meta-parameters (BLOCK_M, BLOCK_N) to the launch grid.
    ``kwargs`` may carry the pass's TMA descriptors and ``TMA_OK=True`` (``_kv_descriptors``,
    ``_qdo_descriptors``): the autotuner then also times the TMA twins (``_prune``); under the
    interpreter they select ``INTERPRETER_TMA_CONFIG``.
    """
    named = dict(zip(_ARG_NAMES[kind], args))
    if _interpreting() or not args[0].is_cuda:
        cfg = INTERPRETER_TMA_CONFIG if kwargs.get("TMA_OK") else INTERPRETER_CONFIG
    elif _FORCE_TMA and kwargs.get("TMA_OK"):
        # Test knob on a GPU: run the TMA twin of the config deterministic mode would run.
        cfg = _prune(kind)(_TMA_CONFIGS[kind], named, **kwargs)[0]
    elif torch.are_deterministic_algorithms_enabled():
        # Timing may pick different tiles in different processes (a different summation order,
        # so last-bit differences); deterministic mode takes the first config the pruning keeps.
        cfg = _deterministic_config(kind, named, kwargs)
    else:
        _TUNED[kind][grid](*args, **kwargs)
        return
    kwargs = _fixed_config_kwargs(cfg, named, kwargs)
    _RAW[kind][grid(cfg.kwargs)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# TMA eligibility and host-side descriptors
# ----------------------------------------------------------------------------------------------

_TMA_ENV = "AIGID_SMSA_TMA"
# Test-only knob. True: treat the device as TMA-capable whatever it is (CPU tensors under the
# interpreter included, which emulates descriptor loads), so the descriptor path can be tested
# without a GPU, and on CUDA run the TMA configs untimed (``_launch``); False: pointers only;
# None: decide from the device. The environment switch and the tensors' layout constraints
# apply in every case.
_FORCE_TMA: Optional[bool] = None


def _is_fake(t: torch.Tensor) -> bool:
    # FakeTensorMode (the compile report) has no addresses: assume the allocator's alignment,
    # as Triton's TensorDescriptor does, and check only the view's storage offset.
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


def _tma_strides(t: torch.Tensor) -> list[int]:
    """``t``'s strides for a descriptor: those of size-1 dims (never stepped over, so free, but
    arbitrary in some views) replaced by the 16-byte-rounded extent of the dims inside them."""
    align = max(1, 16 // t.element_size())
    strides = list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            extent = 1 + sum(strides[j] * (t.shape[j] - 1) for j in range(i + 1, t.dim()))
            strides[i] = -(-extent // align) * align
    return strides


def _tma_layout_reason(t: torch.Tensor) -> Optional[str]:
    """Why TMA cannot address ``t`` as a (B, H, L, d) descriptor (None when it can): the
    cuTensorMapEncodeTiled rules that Triton's TensorDescriptor checks, and int32 coordinates."""
    es = t.element_size()
    if t.dtype not in _DTYPES:
        return f"dtype {t.dtype}"
    if not 1 <= t.dim() <= 5:
        return f"rank {t.dim()} (TMA takes 1 to 5)"
    if t.numel() == 0:
        return "empty tensor"
    if t.stride(-1) != 1:
        return "last dim not contiguous"
    if t.shape[-1] * es % 16:
        return f"rows of {t.shape[-1] * es} B (TMA boxes need a multiple of 16 B)"
    offset = t.storage_offset() * es if _is_fake(t) else t.data_ptr()
    if offset % 16:
        return "base address not 16-byte aligned"
    for n, stride in zip(t.shape[:-1], _tma_strides(t)[:-1]):
        if stride == 0:
            return f"broadcast (zero) stride on a dim of size {n}"
        if stride * es % 16:
            return f"stride of {stride * es} B is not a multiple of 16 B"
        if stride * es >= 2**40:
            return f"stride of {stride * es} B ≥ 2^40 B"
    if max(t.shape) >= 2**31:
        return "a dim ≥ 2^31 (int32 coordinates)"
    return None


def tma_unsupported_reason(tensors: Sequence[torch.Tensor],
                           capability: Optional[int] = None) -> Optional[str]:
    """Why one launch must read ``tensors`` through pointers rather than TMA descriptors (None:
    descriptors are possible). ``capability`` (e.g. 80, 90) defaults to the tensors' device's.

    Order: the ``AIGID_SMSA_TMA=0`` switch and the ``_FORCE_TMA`` knob, then the device (CUDA,
    sm_90+, not the interpreter; skipped when ``_FORCE_TMA`` is True), then every tensor's
    layout (``_tma_layout_reason``). One ineligible tensor sends the whole launch to pointers.
    """
    if os.environ.get(_TMA_ENV, "1").strip() == "0":
        return f"{_TMA_ENV}=0"
    if _FORCE_TMA is False:
        return "TMA forced off"
    if not tensors:
        return "no tensor to read"
    if not _FORCE_TMA:
        if capability is None:
            if _interpreting():
                return "the Triton CPU interpreter (pass _FORCE_TMA to test descriptors there)"
            if not tensors[0].is_cuda:
                return "not a CUDA tensor"
            capability = _capability(tensors[0])
        if capability < 90:
            return f"compute capability {capability // 10}.{capability % 10} has no TMA (< 9.0)"
    for t in tensors:
        reason = _tma_layout_reason(t)
        if reason is not None:
            return reason
    return None


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A rank-4 host-side descriptor over ``t`` (B, H, L, d); its block shape is a placeholder
    until a TMA config's ``pre_hook`` (``_set_tma_block_shapes``) sets [1, 1, rows, d]."""
    return TensorDescriptor(t, list(t.shape), _tma_strides(t), [1, 1, 16, t.shape[-1]])


def _kv_descriptors(sources) -> dict:
    """``{"KD0": ..., "VD0": ..., ..., "TMA_OK": True}`` for the forward and dQ launches when
    every non-empty K/V source can be read through TMA, else ``{}`` (pointer configs only).
    An empty source (L_s = 0, which a descriptor cannot describe) borrows the first non-empty
    source's descriptors: it runs no key block, so they are never read."""
    live = [(k, v) for k, v in sources if k.shape[2] > 0]
    if tma_unsupported_reason([t for pair in live for t in pair]) is not None:
        return {}
    descs = {i: (_descriptor(k), _descriptor(v)) for i, (k, v) in enumerate(sources)
             if k.shape[2] > 0}
    borrowed = next(iter(descs.values()))
    out = {"TMA_OK": True}
    for i in range(len(sources)):
        out[f"KD{i}"], out[f"VD{i}"] = descs.get(i, borrowed)
    return out


def _qdo_descriptors(q: torch.Tensor, do: torch.Tensor) -> dict:
    """``{"QD": ..., "DOD": ..., "TMA_OK": True}`` for the dK/dV launch, or ``{}``."""
    if tma_unsupported_reason([q, do]) is not None:
        return {}
    return {"QD": _descriptor(q), "DOD": _descriptor(do), "TMA_OK": True}


# ----------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------

def unsupported_reason(q: torch.Tensor, kv_sources: Sequence[tuple[torch.Tensor, torch.Tensor]]
                       ) -> Optional[str]:
    """Why the kernel cannot run these inputs (None when it can). Shapes are assumed consistent."""
    if not 1 <= len(kv_sources) <= MAX_SOURCES:
        return f"the kernel takes 1 to {MAX_SOURCES} K/V sources, got {len(kv_sources)}"
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head dim {d} is not supported by the kernel (supported: {SUPPORTED_HEAD_DIMS})"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported by the kernel (fp16, bf16, fp32)"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch × query heads = {q.shape[0] * q.shape[1]} exceeds the grid limit 65535"
    return None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _lengths_tensor(kv_lengths, sources, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """(S, B) int32 valid key counts clamped to [0, L_s], or None when every key is valid."""
    if kv_lengths is None or all(n is None for n in kv_lengths):
        return None
    rows = []
    for (k_s, _), n in zip(sources, kv_lengths):
        l_s = k_s.shape[2]
        if n is None:
            rows.append(torch.full((batch,), l_s, dtype=torch.int32, device=device))
        else:
            rows.append(n.to(device=device, dtype=torch.int32).clamp(0, l_s))
    return torch.stack(rows).contiguous()


def _source_fwd_args(sources):
    """Pointers, strides and lengths of the sources, padded to MAX_SOURCES with dummies."""
    ptrs, strides, lengths = [], [], []
    for i in range(MAX_SOURCES):
        if i < len(sources):
            k, v = sources[i]
            ptrs += [k, v]
            strides += [k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)]
            lengths.append(k.shape[2])
        else:
            ptrs += [sources[0][0], sources[0][1]]
            strides += [0] * 6
            lengths.append(0)
    return ptrs, strides, lengths


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products like torch's SDPA; fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, sources, lens, scale):
    b, h_q, l_q, d = q.shape
    h_kv = sources[0][0].shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h_q, l_q), dtype=torch.float32, device=q.device)
    ptrs, strides, lengths = _source_fwd_args(sources)
    _launch(
        "fwd", lambda meta: (triton.cdiv(l_q, meta["BLOCK_M"]), b * h_q),
        q, out, lse, lens if lens is not None else q, *ptrs,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *strides, *lengths,
        b, h_q, l_q, h_q // h_kv, scale * _LOG2E,
        NUM_SOURCES=len(sources), HAS_LENS=lens is not None, D=d,
        DOT_PREC=_dot_precision(q.dtype), **_kv_descriptors(sources),
    )
    return out, lse


def _backward(do, q, out, lse, sources, lens, scale, need_dq=True, need_dkv=True):
    b, h_q, l_q, d = q.shape
    h_kv = sources[0][0].shape[1]
    group = h_q // h_kv
    prec = _dot_precision(q.dtype)
    ptrs, strides, lengths = _source_fwd_args(sources)
    lens_arg = lens if lens is not None else q

    delta = torch.empty_like(lse)
    if _interpreting() or not q.is_cuda:
        block_pre = _PRE_BLOCK["interpreter"]
    else:
        block_pre = _PRE_BLOCK["small_d" if d <= 64 else "large_d"]
    _bwd_preprocess[(triton.cdiv(l_q, block_pre), b * h_q)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), h_q, l_q, D=d, BLOCK_M=block_pre)

    # dK, dV: one program per (key block of some source, batch row, KV head, GQA split).
    # SPLITS == 1: the programs write dK/dV directly (allocated contiguous, so they share
    # strides). SPLITS > 1: each writes fp32 partials of its heads into one buffer
    # part[kv, slot, b, h_kv, offset_s + n, :] for all sources (kv = 0: dK, 1: dV; slot: a fixed
    # permutation of the split index, see _dkdv_block), summed over the slot axis here in a
    # fixed order (deterministic, no atomics) and cast to the source dtype.
    # Extra memory: SPLITS × 2 × ΣL_s × B·H_kv × d × 4 B of partials, plus one split's worth
    # for the sum; UniGenDet (ΣL_s = 2112, H_kv = 4, d = 128, B = 1) at SPLITS = 2:
    # 2 × 2 × 2112 × 4 × 128 × 4 B = 16.5 MiB (+ 8.25 MiB), against 4.1 MiB of bf16 dK/dV.
    grads = [(None, None)] * len(sources)
    if need_dkv:
        grads = [(torch.empty(k.shape, dtype=k.dtype, device=k.device),
                  torch.empty(v.shape, dtype=v.dtype, device=v.device)) for k, v in sources]
        splits = _dkdv_splits(q, lengths[:len(sources)], b, h_kv, group)
        if splits > 1:
            part = torch.empty((2, splits, b, h_kv, sum(lengths), d), dtype=torch.float32,
                               device=q.device)
            starts = [sum(lengths[:i]) for i in range(len(sources))]
            outs = [(part[0, 0, :, :, s0:s0 + n], part[1, 0, :, :, s0:s0 + n])
                    for s0, n in zip(starts, lengths)]
            split_stride = part.stride(1)
        else:
            outs, split_stride = grads, 0
        kv_args, stride_args = [], []
        for i in range(MAX_SOURCES):
            if i < len(sources):
                k, v = sources[i]
                dk, dv = outs[i]
                kv_args += [k, v, dk, dv]
                stride_args += [k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                                v.stride(2), dk.stride(0), dk.stride(1), dk.stride(2)]
            else:
                kv_args += [q, q, q, q]
                stride_args += [0] * 9
        if sum(lengths) > 0:
            _launch(
                "dkdv",
                lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in lengths), b * h_kv,
                              splits),
                q, do, lse, delta, lens_arg, *kv_args,
                q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
                *stride_args, *lengths,
                b, h_q, h_kv, l_q, group, split_stride, scale, scale * _LOG2E,
                NUM_SOURCES=len(sources), HAS_LENS=lens is not None, SPLITS=splits, D=d,
                DOT_PREC=prec, **_qdo_descriptors(q, do),
            )
            if splits > 1:
                total = part.sum(1)  # (2, B, H_kv, ΣL_s, d), fp32
                for (dk, dv), s0, n in zip(grads, starts, lengths):
                    dk.copy_(total[0, :, :, s0:s0 + n])
                    dv.copy_(total[1, :, :, s0:s0 + n])

    if not need_dq:
        return None, grads
    # dQ: one program per query block, over every source's valid key blocks.
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    _launch(
        "dq", lambda meta: (triton.cdiv(l_q, meta["BLOCK_M"]), b * h_q),
        q, do, dq, lse, delta, lens_arg, *ptrs,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *strides, *lengths,
        b, h_q, l_q, group, scale, scale * _LOG2E,
        NUM_SOURCES=len(sources), HAS_LENS=lens is not None, D=d, DOT_PREC=prec,
        **_kv_descriptors(sources),
    )
    return dq, grads


class SMSAAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, lens, scale, k_0, v_0, k_1, v_1, ...)``.

    ``lens`` is the (S, B) int32 valid-length table from ``_lengths_tensor`` or None; inputs have
    a contiguous last dim (``smsa_attention_triton`` sees to that).
    """

    @staticmethod
    def forward(ctx, q, lens, scale, *kv_flat):
        sources = [(kv_flat[i], kv_flat[i + 1]) for i in range(0, len(kv_flat), 2)]
        if q.numel() == 0:
            out = torch.zeros_like(q)
            lse = torch.empty((*q.shape[:3],), dtype=torch.float32, device=q.device)
        else:
            out, lse = _forward(q, sources, lens, scale)
        ctx.save_for_backward(q, out, lse, *((lens,) if lens is not None else ()), *kv_flat)
        ctx.has_lens = lens is not None
        ctx.scale = scale
        ctx.num_sources = len(sources)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, out, lse = saved[:3]
        lens = saved[3] if ctx.has_lens else None
        kv_flat = saved[4:] if ctx.has_lens else saved[3:]
        sources = [(kv_flat[i], kv_flat[i + 1]) for i in range(0, len(kv_flat), 2)]
        if q.numel() == 0:
            dq = torch.zeros_like(q)
            grads = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in sources]
        else:
            do = _last_dim_contiguous(grad_out)
            need = ctx.needs_input_grad
            dq, grads = _backward(do, q, out, lse, sources, lens, ctx.scale,
                                  need_dq=need[0], need_dkv=any(need[3:]))
        flat_grads = [g for pair in grads for g in pair]
        return (dq, None, None, *flat_grads)


def smsa_attention_triton(
    q: torch.Tensor,
    kv_sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
    kv_lengths: Optional[Sequence[Optional[torch.Tensor]]] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Fused SMSA attention (see the module docstring); same contract as the reference.

    Raises ValueError for inputs the kernel does not take (more than ``MAX_SOURCES`` sources,
    head dims outside ``SUPPORTED_HEAD_DIMS``, other dtypes). Callers normally go through
    ``aigid.ops.smsa_attention``, which validates shapes and falls back to the reference.
    """
    sources = [(k, v) for k, v in kv_sources]
    reason = unsupported_reason(q, sources)
    if reason is not None:
        raise ValueError(f"smsa_attention_triton: {reason}")
    if kv_lengths is not None and len(kv_lengths) != len(sources):
        raise ValueError("kv_lengths needs one entry (or None) per source")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    q = _last_dim_contiguous(q)
    sources = [(_last_dim_contiguous(k), _last_dim_contiguous(v)) for k, v in sources]
    lens = _lengths_tensor(kv_lengths, sources, q.shape[0], q.device)
    flat = [t for pair in sources for t in pair]
    return SMSAAttentionFunction.apply(q, lens, scale, *flat)
