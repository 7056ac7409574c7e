"""The fused SMSA attention kernel against its plain-PyTorch reference, and its dispatch.

On CPU the Triton kernel runs under ``TRITON_INTERPRET=1`` (set by conftest.py) at small sizes in
fp32 with 16×16 blocks, so the lengths below put block edges inside every source. GPU tests
(``-m gpu``) check bf16/fp16 parity at realistic sizes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigid import backends, ops
from aigid.kernels.reference import smsa_attention_reference
from triton.tools.tensor_descriptor import TensorDescriptor

smsa_kernel = pytest.importorskip("aigid.kernels.smsa_attention", reason="needs Triton")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# The kernel path runs on CUDA, or on CPU under the interpreter.
needs_kernel_device = pytest.mark.skipif(
    not (CUDA or backends.triton_interpret()),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
ATOL = RTOL = 1e-4


def _inputs(b, h_q, h_kv, l_q, lengths, d, dtype=torch.float32, device=DEV):
    q = torch.randn(b, h_q, l_q, d, device=device, dtype=dtype, requires_grad=True)
    sources = [(torch.randn(b, h_kv, n, d, device=device, dtype=dtype, requires_grad=True),
                torch.randn(b, h_kv, n, d, device=device, dtype=dtype, requires_grad=True))
               for n in lengths]
    return q, sources


def _run(fn, q, sources, kv_lengths, grad_out, scale=None):
    out = fn(q, sources, kv_lengths, scale)
    leaves = [q] + [t for pair in sources for t in pair]
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


def _kernel(q, sources, kv_lengths, scale):
    return ops.smsa_attention(q, sources, kv_lengths, scale, backend="triton")


def _assert_matches(q, sources, kv_lengths=None, scale=None, atol=ATOL, rtol=RTOL):
    grad_out = torch.randn_like(q)
    out, grads = _run(_kernel, q, sources, kv_lengths, grad_out, scale)
    out_ref, grads_ref = _run(smsa_attention_reference, q, sources, kv_lengths, grad_out, scale)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    names = ["dq"] + [f"d{kv}_{i}" for i in range(len(sources)) for kv in ("k", "v")]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return out, grads


def _lengths(values, device=DEV):
    return [None if v is None else torch.tensor(v, device=device) for v in values]


# ---------------------------------------------------------------------------------------------
# Parity with the reference (interpreter on CPU, fp32)
# ---------------------------------------------------------------------------------------------

@needs_kernel_device
@pytest.mark.parametrize(
    "b, h_q, h_kv, l_q, src_lens, d",
    [
        (1, 2, 2, 40, (40,), 32),          # one source, MHA, two-and-a-half key blocks
        (2, 4, 2, 17, (17, 33), 16),       # two sources, GQA 2, lengths off the block size
        (2, 4, 1, 37, (20, 33, 9), 16),    # three sources, GQA 4
        (1, 2, 1, 16, (5, 16, 31), 32),    # exact query block, GQA 2, d = 32
    ],
)
def test_matches_reference(b, h_q, h_kv, l_q, src_lens, d):
    q, sources = _inputs(b, h_q, h_kv, l_q, src_lens, d)
    _assert_matches(q, sources)


# The forward and dQ run each source's full key blocks unmasked and mask only its ragged tail
# block; dK/dV masks no key inside its query loop and zeroes the invalid key rows afterwards.
# Under the interpreter the tile is 16×16 (INTERPRETER_CONFIG), so these lengths put every
# source at, below or off a block edge.
BLOCK = 16
FP16_ATOL = FP16_RTOL = 2e-2  # fp16 inputs and P·V / dS·Q operands, fp32 accumulation


def _assert_matches_fp16(q, sources, kv_lengths=None):
    """fp16 kernel against the fp32 reference on the same (fp16-rounded) inputs."""
    grad_out = torch.randn_like(q)
    out, grads = _run(_kernel, q, sources, kv_lengths, grad_out)
    q32 = q.detach().float().requires_grad_()
    src32 = [(k.detach().float().requires_grad_(), v.detach().float().requires_grad_())
             for k, v in sources]
    out32, grads32 = _run(smsa_attention_reference, q32, src32, kv_lengths, grad_out.float())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), out32, atol=FP16_ATOL, rtol=FP16_RTOL)
    names = ["dq"] + [f"d{kv}_{i}" for i in range(len(sources)) for kv in ("k", "v")]
    for name, g, g32 in zip(names, grads, grads32):
        torch.testing.assert_close(g.float(), g32, atol=FP16_ATOL, rtol=FP16_RTOL,
                                   msg=lambda m: f"{name}: {m}")


def test_interpreter_tile_is_the_one_these_lengths_assume():
    """Catches: the interpreter tile changing so the split tests below stop straddling edges."""
    cfg = smsa_kernel.INTERPRETER_CONFIG
    assert cfg.kwargs == {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK}


@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "l_q, src_lens, kv_lengths",
    [
        # Every source an exact multiple of BLOCK_N, L_q too: main loops only, no tail anywhere.
        (2 * BLOCK, (2 * BLOCK, BLOCK), None),
        # Off the block size: full blocks then a tail; L_q ragged (masked last query block).
        (BLOCK + 3, (2 * BLOCK + 1, BLOCK - 1), None),
        # Single-block sources (exactly one block, and one shorter than a block) and an empty
        # source (L_s = 0: no block at all, empty gradients).
        (9, (BLOCK, 5, 0), None),
        # Per-source valid lengths (batch rows 0, 1) on a block edge inside a longer source (the
        # split follows the valid length, not L_s), one key past an edge, zero valid keys.
        (BLOCK + 1, (2 * BLOCK + 5, BLOCK + 7), [[BLOCK, 2 * BLOCK + 1], [BLOCK + 1, 0]]),
    ],
    ids=["exact-multiples", "ragged", "single-block-and-empty", "valid-length-on-edge"],
)
def test_unmasked_main_loop_and_masked_tail_match_reference(l_q, src_lens, kv_lengths, dtype):
    """Catches: skipping a source's tail block, running the tail unmasked (keys past the valid
    length leak into the softmax or get gradients), folding the tail into the unmasked main
    loop, deriving the split from L_s instead of the valid length, not zeroing dK/dV rows past
    the valid length, and dropping the last query block of dK/dV."""
    b = 1 if kv_lengths is None else len(kv_lengths[0])
    q, sources = _inputs(b, 2, 1, l_q, src_lens, 16, dtype=dtype)  # GQA 2
    lengths = None if kv_lengths is None else _lengths(kv_lengths)
    if dtype == torch.float32:
        _assert_matches(q, sources, lengths)
    else:
        _assert_matches_fp16(q, sources, lengths)


# ---------------------------------------------------------------------------------------------
# Autotune set and grid-fill pruning (pure Python: what runs on CUDA)
# ---------------------------------------------------------------------------------------------

def _unigendet_args(l_q, src_lens=(1024, 1024, 448)):
    args = dict(Q=torch.empty(0), B=1, H_q=28, H_kv=4, L_q=l_q, D=128)
    args.update({f"L{i}": (list(src_lens) + [0] * 4)[i] for i in range(4)})
    return args


def _acc_regs_per_thread(kind, cfg, d):
    acc = 2 * cfg.kwargs["BLOCK_N"] * d if kind == "dkdv" else cfg.kwargs["BLOCK_M"] * d
    return acc / (32 * cfg.num_warps)


def test_autotune_configs_are_listed_and_wgmma_sized():
    """Catches: a config whose MMA M-dim is below a Hopper warpgroup's 64 rows (mma.sync
    fallback on sm_90a), a candidate whose fp32 accumulators exceed 64 registers per thread
    (ptxas spills), a 4-warp d = 128 tile offered on sm_80 (spills there), or a pass left
    without configs for the compile report to enumerate."""
    for kind, mma_m in (("fwd", "BLOCK_M"), ("dq", "BLOCK_M"), ("dkdv", "BLOCK_N")):
        configs = smsa_kernel.AUTOTUNE_CONFIGS[kind]
        pointer = [c for c in configs if not smsa_kernel._is_tma(c)]
        assert 2 <= len(pointer) <= 4
        assert all(c.kwargs[mma_m] >= 64 for c in configs)
        for d in smsa_kernel.SUPPORTED_HEAD_DIMS:
            for cap in (80, 90):
                cands = smsa_kernel.candidate_configs(kind, d, cap)
                assert cands and all(_acc_regs_per_thread(kind, c, d) <= 64 for c in cands)
        assert all(c.num_warps == 8 for c in smsa_kernel.candidate_configs(kind, 128, 80))
    dkdv = smsa_kernel.candidate_configs
    assert len(dkdv("dkdv", 64)) > len(dkdv("dkdv", 128))


def test_grid_fill_pruning_at_unigendet_sizes():
    """Catches: the pruning keeping 128-row tiles when they give under two waves of 132 SMs
    while 64-row tiles fill them (L_q = 1024), dropping configs when every one fills the GPU
    (L_q = 4096), or returning nothing when none does."""
    prune = smsa_kernel._prune("fwd")
    configs = smsa_kernel.AUTOTUNE_CONFIGS["fwd"]
    kept = prune(configs, _unigendet_args(1024))  # 28·8 = 224 CTAs at 128 rows, 448 at 64
    assert kept and all(c.kwargs["BLOCK_M"] == 64 for c in kept)
    # d = 128 drops the 4-warp 128-row tile; no descriptors (no TMA_OK): pointer configs only
    fits = [c for c in smsa_kernel.candidate_configs("fwd", 128) if not smsa_kernel._is_tma(c)]
    assert len(fits) == len(smsa_kernel._POINTER_CONFIGS["fwd"]) - 1
    assert prune(configs, _unigendet_args(4096)) == fits  # 28·32 = 896 CTAs at 128 rows
    assert prune(configs, _unigendet_args(64)) == fits  # nothing fills the GPU: keep them all
    dkdv = smsa_kernel._prune("dkdv")(smsa_kernel.AUTOTUNE_CONFIGS["dkdv"], _unigendet_args(1024))
    assert dkdv and all(_acc_regs_per_thread("dkdv", c, 128) <= 64 for c in dkdv)


# ---------------------------------------------------------------------------------------------
# dK/dV GQA split (grid axis 2): SPLITS programs per key block, fp32 partials summed by torch
# ---------------------------------------------------------------------------------------------

def _spy_dkdv_launches(monkeypatch):
    """Record (grid, arguments by name) of every dK/dV launch, the grid for the config run."""
    calls = []
    real = smsa_kernel._launch

    def spy(kind, grid, *args, **kwargs):
        if kind == "dkdv":
            named = dict(zip(smsa_kernel._bwd_dkdv_kernel.arg_names, args), **kwargs)
            calls.append((tuple(grid(smsa_kernel.INTERPRETER_CONFIG.kwargs)), named))
        return real(kind, grid, *args, **kwargs)

    monkeypatch.setattr(smsa_kernel, "_launch", spy)
    return calls


@needs_kernel_device
@pytest.mark.parametrize(
    "h_q, h_kv, splits, launched",
    [
        (4, 1, 2, 2),   # GROUP 4, 2 heads per split
        (4, 1, 3, 3),   # a split count not dividing GROUP: heads {0, 3}, {1}, {2}
        (4, 1, 4, 4),   # one head per split (SPLITS = GROUP)
        (6, 2, 2, 2),   # two KV heads, GROUP 3: heads {0, 2}, {1}
        (6, 2, 3, 3),   # SPLITS = GROUP = 3
        (2, 2, 3, 1),   # GROUP 1: a forced split is clamped to the group, direct path
    ],
    ids=["g4-s2", "g4-s3", "g4-s4", "g3-s2", "g3-s3", "g1-clamped"],
)
def test_dkdv_gqa_split_matches_reference(monkeypatch, h_q, h_kv, splits, launched):
    """Catches: a split looping from head 0 instead of pid_s (heads counted twice, others
    dropped), a split stride missing from the store (all splits overwrite split 0 and the other
    partials stay uninitialised), the host summing only part of the split axis (first two
    splits), keys past a ragged valid length left with nonzero partials, the forced count
    ignored (grid axis 2 ≠ SPLITS) or not clamped to the group, a partial buffer for SPLITS 1."""
    monkeypatch.setattr(smsa_kernel, "_FORCE_DKDV_SPLITS", splits)
    calls = _spy_dkdv_launches(monkeypatch)
    # Three sources, the middle one empty; batch row 1 has a valid length on a block edge in
    # source 0 and no valid key in source 2; L_q ragged.
    q, sources = _inputs(2, h_q, h_kv, BLOCK + 3, (2 * BLOCK + 5, 0, BLOCK + 7), 16)
    _assert_matches(q, sources, _lengths([[2 * BLOCK + 5, BLOCK], None, [9, 0]]))
    assert [(grid[2], named["SPLITS"]) for grid, named in calls] == [(launched, launched)]


@needs_kernel_device
def test_dkdv_gqa_split_with_four_sources_and_no_lengths(monkeypatch):
    """Catches: a per-source branch of the kernel (source 3's runs only with four sources) not
    handed its split index, the split path assuming valid lengths (HAS_LENS), or the shared
    buffer's source offsets off by one source (an empty third source before a non-empty one)."""
    monkeypatch.setattr(smsa_kernel, "_FORCE_DKDV_SPLITS", 2)
    q, sources = _inputs(1, 3, 1, 9, (3, 17, 0, 12), 16)  # GROUP 3, SPLITS 2: heads {0, 2}, {1}
    _assert_matches(q, sources)


@needs_kernel_device
def test_unsplit_dkdv_writes_the_gradients_directly(monkeypatch):
    """Catches: the default path (SPLITS = 1) routed through an fp32 partial buffer and a torch
    reduction (extra memory and a pass the unsplit launch never needs), or a split launched under
    the interpreter without being forced."""
    calls = _spy_dkdv_launches(monkeypatch)
    q, sources = _inputs(1, 4, 1, 10, (7, 12), 16)
    out = smsa_kernel.smsa_attention_triton(q, sources)
    leaves = [t for pair in sources for t in pair]
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    (grid, launched), = calls
    assert grid[2] == 1 and launched["SPLITS"] == 1
    for i in range(2):
        assert launched[f"DK{i}"].data_ptr() == grads[2 * i].data_ptr()
        assert launched[f"DV{i}"].data_ptr() == grads[2 * i + 1].data_ptr()
        assert launched[f"DK{i}"].dtype == q.dtype


def test_dkdv_split_count_fills_two_waves_at_unigendet_sizes():
    """Catches: a split heuristic that ignores the wave target (always 1 or always GROUP),
    proposes unbalanced counts (5 or 6 heads' splits for G = 7, no shorter critical path than 4),
    sizes the split at the largest candidate BLOCK_N instead of the smallest (too many splits at
    d = 64), or applies the split under the CPU interpreter without being forced."""
    split = smsa_kernel._grid_fill_splits
    assert smsa_kernel._split_counts(7) == [1, 2, 3, 4, 7]
    assert smsa_kernel._split_counts(4) == [1, 2, 4]
    assert smsa_kernel._split_counts(1) == [1]
    # UniGenDet, H100 (132 SMs): 33·4 = 132 CTAs at BLOCK_N = 64 -> 2 splits, 264 = 2 waves;
    # ΣL_s = 2496: 156 -> 312 CTAs; A100 (108 SMs): 132 -> 264 ≥ 216. Same at d = 64, where a
    # 128-key tile is also a candidate (17·4 = 68 CTAs there would ask for 4 splits).
    assert split((64, 1024, 1024), 1, 4, 7, 128) == 2
    assert split((1024, 1024, 448), 1, 4, 7, 128) == 2
    assert split((64, 1024, 1024), 1, 4, 7, 128, capability=80, sms=108) == 2
    assert split((64, 1024, 1024), 1, 4, 7, 64) == 2
    # bench Lq256 (B 2, G 4): 96 CTAs -> 2 splits give 192 < 264, so 4; Lq1024: 384 already.
    assert split((256,) * 3, 2, 4, 4, 128) == 4
    assert split((1024,) * 3, 2, 4, 4, 128) == 1
    assert split((16,), 1, 1, 7, 128) == 7  # nothing fills the GPU: one head per program
    assert split((16,), 1, 1, 1, 128) == 1
    q = torch.empty(1, 28, 1024, 128)  # CPU tensor: the interpreter path
    assert smsa_kernel._dkdv_splits(q, (64, 1024, 1024), 1, 4, 7) == 1
    assert smsa_kernel._dkdv_splits(q, (64, 1024, 1024), 1, 4, 7, forced=3) == 3
    assert smsa_kernel._dkdv_splits(q, (64, 1024, 1024), 1, 4, 7, forced=9) == 7


def test_dkdv_pruning_counts_the_split_grid():
    """Catches: ``_grid_ctas`` ignoring the split factor, so the pruning keeps a 128-key tile
    that halves a split grid below two waves (d = 64, UniGenDet at SPLITS = 2: 64-key tiles
    give 39·4·2 = 312 CTAs, 128-key tiles 20·4·2 = 160 < 264)."""
    configs = smsa_kernel.AUTOTUNE_CONFIGS["dkdv"]
    args = dict(_unigendet_args(1024), D=64)
    assert any(c.kwargs["BLOCK_N"] == 128 for c in smsa_kernel.candidate_configs("dkdv", 64))
    cfg128 = next(c for c in configs if c.kwargs["BLOCK_N"] == 128)
    assert smsa_kernel._grid_ctas("dkdv", cfg128, dict(args, SPLITS=2)) == 160
    unsplit = smsa_kernel._prune("dkdv")(configs, args)  # 156 / 80 CTAs: none fills, keep all
    assert any(c.kwargs["BLOCK_N"] == 128 for c in unsplit)
    kept = smsa_kernel._prune("dkdv")(configs, dict(args, SPLITS=2))
    assert kept and all(c.kwargs["BLOCK_N"] == 64 for c in kept)


@needs_kernel_device
def test_padding_masks_and_empty_rows():
    # Batch row 1 has no key in source 0; batch row 2 has no key in any source (zero output,
    # zero gradients), so its key blocks are never read.
    b, h_q, h_kv, l_q, d = 3, 4, 2, 19, 16
    q, sources = _inputs(b, h_q, h_kv, l_q, (21, 34, 7), d)
    kv_lengths = _lengths([[21, 0, 0], [3, 17, 0], [7, 5, 0]])
    out, grads = _assert_matches(q, sources, kv_lengths)
    assert torch.all(out[2] == 0)
    assert all(torch.all(g[2] == 0) for g in grads)
    # Keys past their valid length get no gradient.
    dk1, dv1 = grads[3], grads[4]
    assert torch.all(dk1[0, :, 3:] == 0) and torch.all(dv1[1, :, 17:] == 0)


@needs_kernel_device
def test_lengths_beyond_source_are_clamped_and_scale_is_honoured():
    q, sources = _inputs(2, 2, 1, 12, (18, 9), 16)
    _assert_matches(q, sources, _lengths([[40, 18], [9, 3]]), scale=0.37)


@needs_kernel_device
def test_four_sources():
    q, sources = _inputs(1, 2, 1, 9, (3, 17, 1, 12), 16)
    _assert_matches(q, sources, _lengths([None, [10], None, [0]]))


@needs_kernel_device
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_reads_strided_views_of_a_packed_buffer_in_place(tma, monkeypatch):
    """K/V of all sources packed as (B, ΣL, 2, H_kv, d), q as (B, L_q, H_q, d): the kernel takes
    the strided (B, H, L, d) views directly and gradients reach the packed buffers. Catches a
    kernel that assumes contiguous sources; with TMA forced, descriptors built as if they were
    (shape/strides of a packed (B, H, L, d) block instead of the view's own strides, or a 2-D
    flattening that runs into the next head)."""
    calls = _force_tma(monkeypatch) if tma else None
    b, h_q, h_kv, l_q, d, src_lens = 2, 4, 2, 18, 16, (11, 20)
    packed = torch.randn(b, sum(src_lens), 2, h_kv, d, device=DEV, requires_grad=True)
    q_raw = torch.randn(b, l_q, h_q, d, device=DEV, requires_grad=True)
    grad_out = torch.randn(b, h_q, l_q, d, device=DEV)

    def run(fn):
        q = q_raw.transpose(1, 2)
        sources, start = [], 0
        for n in src_lens:
            chunk = packed[:, start:start + n]
            sources.append((chunk[:, :, 0].transpose(1, 2), chunk[:, :, 1].transpose(1, 2)))
            start += n
        assert not sources[0][0].is_contiguous()
        if tma:
            assert smsa_kernel.tma_unsupported_reason([q] + [t for p in sources for t in p]) is None
        out = fn(q, sources, [torch.tensor([11, 4], device=DEV), None], None)
        return (out, *torch.autograd.grad(out, [q_raw, packed], grad_out))

    for got, want in zip(run(_kernel), run(smsa_attention_reference)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    if tma:
        assert calls == [("fwd", True, _kv_descs(2)), ("dkdv", True, ["DOD", "QD"]),
                         ("dq", True, _kv_descs(2))]


@needs_kernel_device
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ragged_batches(data):
    n_src = data.draw(st.integers(1, 3), label="sources")
    b = data.draw(st.integers(1, 2), label="batch")
    group = data.draw(st.sampled_from([1, 2]), label="gqa")
    l_q = data.draw(st.integers(1, 20), label="l_q")
    src_lens = [data.draw(st.integers(1, 24), label=f"L_{i}") for i in range(n_src)]
    kv_lengths = [data.draw(st.none() | st.lists(st.integers(0, n), min_size=b, max_size=b),
                            label=f"lengths_{i}") for i, n in enumerate(src_lens)]
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    q, sources = _inputs(b, group, 1, l_q, src_lens, 16)
    _assert_matches(q, sources, _lengths(kv_lengths))


@needs_kernel_device
def test_kernel_function_and_autograd_function_directly():
    q, sources = _inputs(1, 2, 1, 10, (7, 12), 16)
    out = smsa_kernel.smsa_attention_triton(q, sources)
    torch.testing.assert_close(out, smsa_attention_reference(q, sources), atol=ATOL, rtol=RTOL)
    assert issubclass(smsa_kernel.SMSAAttentionFunction, torch.autograd.Function)
    # Only q trainable (frozen K/V caches), then only K/V trainable: the skipped kernels leave the
    # requested gradients intact.
    grad_out = torch.randn_like(q)
    frozen = [(k.detach(), v.detach()) for k, v in sources]
    dq, = torch.autograd.grad(smsa_kernel.smsa_attention_triton(q, frozen), [q], grad_out)
    dq_ref, = torch.autograd.grad(smsa_attention_reference(q, frozen), [q], grad_out)
    torch.testing.assert_close(dq, dq_ref, atol=ATOL, rtol=RTOL)
    q_frozen = q.detach()
    leaves = [t for pair in sources for t in pair]
    got = torch.autograd.grad(smsa_kernel.smsa_attention_triton(q_frozen, sources), leaves, grad_out)
    want = torch.autograd.grad(smsa_attention_reference(q_frozen, sources), leaves, grad_out)
    for g, g_ref in zip(got, want):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


@needs_kernel_device
def test_unsupported_inputs_raise_clear_errors_on_the_kernel():
    q, sources = _inputs(1, 2, 1, 4, (3,), 24, device="cpu")
    with pytest.raises(ValueError, match="head dim 24"):
        smsa_kernel.smsa_attention_triton(q, sources)
    q, sources = _inputs(1, 2, 1, 4, (3,) * 5, 16, device="cpu")
    with pytest.raises(ValueError, match="1 to 4"):
        smsa_kernel.smsa_attention_triton(q, sources)


# ---------------------------------------------------------------------------------------------
# TMA descriptors (sm_90+): host-side descriptors, forced under the interpreter
# ---------------------------------------------------------------------------------------------

def _spy_raw_launches(monkeypatch):
    """Record, per kernel launch outside the autotuner, (pass, USE_TMA, descriptor names)."""
    calls = []

    class Spy:
        def __init__(self, kind, fn):
            self.kind, self.fn = kind, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                descs = sorted(k for k, v in kwargs.items() if isinstance(v, TensorDescriptor))
                calls.append((self.kind, bool(kwargs.get("USE_TMA", False)), descs))
                return self.fn[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(smsa_kernel, "_RAW", {k: Spy(k, f) for k, f in smsa_kernel._RAW.items()})
    return calls


def _force_tma(monkeypatch, on=True):
    monkeypatch.delenv("AIGID_SMSA_TMA", raising=False)
    monkeypatch.setattr(smsa_kernel, "_FORCE_TMA", on)
    return _spy_raw_launches(monkeypatch)


def _kv_descs(n_src):
    return sorted(f"{kv}D{i}" for i in range(n_src) for kv in "KV")


@needs_kernel_device
@pytest.mark.parametrize(
    "b, h_q, h_kv, l_q, src_lens, d, kv_lengths, splits",
    [
        (1, 2, 2, 40, (40,), 32, None, None),   # one source, MHA, L off the tile, d = 32
        # three sources (the middle one empty: it borrows a descriptor it never reads), GQA 2,
        # ragged valid lengths (on a block edge, off it, zero keys), L_q off the tile
        (2, 4, 2, 19, (21, 0, 34), 16, [[21, 3], None, [17, 0]], None),
        (1, 3, 1, 9, (3, 17, 1, 12), 16, [None, [10], None, [0]], None),  # four sources, GQA 3
        (1, 4, 1, 2 * BLOCK, (2 * BLOCK, BLOCK), 16, None, None),  # exact tiles, no tail at all
        (2, 4, 1, BLOCK + 3, (2 * BLOCK + 5, BLOCK + 7), 16, [[2 * BLOCK + 5, BLOCK], [9, 0]],
         3),  # dK/dV GQA split (3 of GROUP 4) reading Q/dO through descriptors
    ],
    ids=["one-source", "three-sources-ragged", "four-sources-gqa3", "exact-tiles", "split"],
)
def test_tma_path_matches_reference(monkeypatch, b, h_q, h_kv, l_q, src_lens, d, kv_lengths,
                                    splits):
    """Catches, on the descriptor path: K/V read at the query head instead of the KV head
    (GQA), Q/dO read at the KV head in dK/dV, the tail's -inf score masking dropped for
    descriptors (keys in [valid length, L_s) leak into the softmax), a descriptor coordinate
    in the wrong dim, an empty source's borrowed descriptor being read, and any pass silently
    falling back to pointers when TMA is forced (every launch must use USE_TMA)."""
    calls = _force_tma(monkeypatch)
    if splits is not None:
        monkeypatch.setattr(smsa_kernel, "_FORCE_DKDV_SPLITS", splits)
    q, sources = _inputs(b, h_q, h_kv, l_q, src_lens, d)
    _assert_matches(q, sources, None if kv_lengths is None else _lengths(kv_lengths))
    kv = _kv_descs(len(src_lens))
    assert calls == [("fwd", True, kv), ("dkdv", True, ["DOD", "QD"]), ("dq", True, kv)]


@needs_kernel_device
def test_tma_fp16_matches_reference(monkeypatch):
    """Catches a descriptor path that only works in fp32 (a block shape in bytes rather than
    elements, an fp32 cast of the tile before the dot)."""
    calls = _force_tma(monkeypatch)
    q, sources = _inputs(2, 4, 2, BLOCK + 1, (2 * BLOCK + 5, BLOCK + 7), 16, dtype=torch.float16)
    _assert_matches_fp16(q, sources, _lengths([[BLOCK, 2 * BLOCK + 1], [BLOCK + 1, 0]]))
    assert [c[1] for c in calls] == [True, True, True]


@needs_kernel_device
def test_tma_tail_ignores_garbage_past_the_valid_length(monkeypatch):
    """Catches a descriptor tail block that does not zero K/V rows in [valid length, L_s): the
    copy engine zero-fills only rows ≥ L_s, and 0 · NaN = NaN, so padding that holds NaN (an
    uninitialised cache) would poison O (P·V) and dQ (dO·Vᵀ, dS·K). The pointer path never
    reads those rows; the descriptor path must give the same result."""
    calls = _force_tma(monkeypatch)
    b, h_q, h_kv, l_q, d, src_lens = 2, 4, 2, 19, 16, (21, 34)
    valid = [[21, 3], [17, 0]]
    q = torch.randn(b, h_q, l_q, d, device=DEV, requires_grad=True)
    clean, poisoned = [], []
    for n, lens in zip(src_lens, valid):
        pad = torch.arange(n, device=DEV)[None, :] >= torch.tensor(lens, device=DEV)[:, None]
        pad = pad[:, None, :, None]  # (B, 1, L_s, 1)
        pair_c, pair_p = [], []
        for _ in range(2):
            x = torch.randn(b, h_kv, n, d, device=DEV).masked_fill(pad, 0.0)
            pair_c.append(x.clone().requires_grad_())
            pair_p.append(x.masked_fill(pad, float("nan")).requires_grad_())
        clean.append(tuple(pair_c))
        poisoned.append(tuple(pair_p))
    grad_out = torch.randn_like(q)
    out, grads = _run(_kernel, q, poisoned, _lengths(valid), grad_out)
    out_ref, grads_ref = _run(smsa_attention_reference, q, clean, _lengths(valid), grad_out)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=RTOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)
    assert [c[1] for c in calls] == [True, True, True]


def test_tma_eligibility_falls_back_to_pointers(monkeypatch):
    """Catches an eligibility check that lets TMA see what it cannot address — a base address
    or a non-last stride that is not a multiple of 16 bytes, a non-contiguous last dim, a
    broadcast (zero) stride — that offers descriptors below sm_90 or under the interpreter
    unless forced, that ignores AIGID_SMSA_TMA=0 (even when forced), or that rejects the
    aligned case (contiguous, a size-1 dim with an odd stride)."""
    monkeypatch.delenv("AIGID_SMSA_TMA", raising=False)
    reason = smsa_kernel.tma_unsupported_reason
    x = torch.randn(2, 3, 20, 16)
    assert reason([x], capability=90) is None
    assert "9.0" in reason([x], capability=80)
    assert reason([x]) is not None  # CPU tensor / interpreter, not forced: pointers
    odd_row = torch.randn(2, 3, 20, 17)[..., :16]  # row stride 68 B
    assert "stride" in reason([x, odd_row], capability=90)
    shifted = torch.randn(2 * 3 * 20 * 16 + 1)[1:].view(2, 3, 20, 16)  # base + 4 B
    assert "aligned" in reason([shifted], capability=90)
    assert "contiguous" in reason([x.transpose(2, 3)], capability=90)
    assert "zero" in reason([torch.randn(1, 3, 1, 16).expand(2, 3, 20, 16)], capability=90)
    # a size-1 dim's stride is never used: it may be anything (here 1 element = 4 B)
    one_head = torch.randn(2, 20, 16).unsqueeze(1).as_strided((2, 1, 20, 16), (320, 1, 16, 1))
    assert reason([one_head], capability=90) is None
    monkeypatch.setattr(smsa_kernel, "_FORCE_TMA", True)
    assert reason([x]) is None and reason([x], capability=80) is None
    assert reason([odd_row]) is not None  # forcing never overrides the layout rules
    monkeypatch.setenv("AIGID_SMSA_TMA", "0")
    assert "AIGID_SMSA_TMA" in reason([x], capability=90)
    monkeypatch.setattr(smsa_kernel, "_FORCE_TMA", False)
    monkeypatch.delenv("AIGID_SMSA_TMA")
    assert reason([x], capability=90) is not None


@needs_kernel_device
@pytest.mark.parametrize("case", ["misaligned-view", "env-off", "not-forced"])
def test_ineligible_launches_run_the_pointer_kernels(monkeypatch, case):
    """Catches a host that passes descriptors for a misaligned source (TensorDescriptor would
    assert, TMA would fault) or despite AIGID_SMSA_TMA=0, or that picks the descriptor path on
    CPU without the test knob; the pointer kernels then get no descriptor at all (the compiled
    pointer kernel is the one without TMA parameters)."""
    calls = _force_tma(monkeypatch, on=case != "not-forced")
    q, sources = _inputs(1, 2, 1, 9, (7, 12), 16)
    if case == "misaligned-view":  # source 1's rows 17 floats apart: 68 B, not a multiple of 16
        wide = [torch.randn(1, 1, 12, 17, requires_grad=True) for _ in range(2)]
        sources[1] = (wide[0][..., :16], wide[1][..., :16])
    else:
        wide = []
    if case == "env-off":
        monkeypatch.setenv("AIGID_SMSA_TMA", "0")
    grad_out = torch.randn_like(q)
    leaves = [q] + [t for p in sources for t in p if t.is_leaf] + wide
    out = _kernel(q, sources, None, None)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(smsa_attention_reference(q, sources), leaves, grad_out)
    for g, g_ref in zip((out, *got), (smsa_attention_reference(q, sources), *want)):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)
    if case == "misaligned-view":  # dK/dV reads Q and dO, which are aligned
        assert calls == [("fwd", False, []), ("dkdv", True, ["DOD", "QD"]), ("dq", False, [])]
    else:
        assert calls == [("fwd", False, []), ("dkdv", False, []), ("dq", False, [])]


def test_tma_configs_join_the_autotune_set_only_with_descriptors_on_sm90(monkeypatch):
    """Catches: TMA configs offered on sm_80 or to a launch without descriptors (the kernel
    would index a None descriptor), pointer configs dropped or ordered after the TMA ones
    (deterministic mode must keep running the first pointer config), a TMA config missing its
    block-shape pre_hook, and an autotune key without TMA_OK (a TMA tile cached for a shape
    would be reused by a later launch of that shape that has no descriptors)."""
    for kind in ("fwd", "dkdv", "dq"):
        pointer, tma = smsa_kernel._POINTER_CONFIGS[kind], smsa_kernel._TMA_CONFIGS[kind]
        assert smsa_kernel.AUTOTUNE_CONFIGS[kind] == pointer + tma
        assert tma and all(c.pre_hook is smsa_kernel._set_tma_block_shapes for c in tma)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in tma] == [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                   c.num_stages) for c in pointer]
        assert not any(smsa_kernel._is_tma(c) for c in smsa_kernel.candidate_configs(kind, 64, 80))
        assert "TMA_OK" in smsa_kernel._TUNED[kind].keys
        args = dict(_unigendet_args(4096), D=64)
        prune = smsa_kernel._prune(kind)
        configs = smsa_kernel.AUTOTUNE_CONFIGS[kind]
        without = prune(configs, args)
        with_tma = prune(configs, dict(args, TMA_OK=True))
        assert without and not any(smsa_kernel._is_tma(c) for c in without)
        assert with_tma[:len(without)] == without
        assert [c for c in with_tma if smsa_kernel._is_tma(c)]
        first = smsa_kernel._deterministic_config(kind, args, {"TMA_OK": True})
        assert first is without[0] and not smsa_kernel._is_tma(first)
        monkeypatch.setattr(smsa_kernel, "_capability", lambda t: 80)
        assert not any(smsa_kernel._is_tma(c) for c in prune(configs, dict(args, TMA_OK=True)))
        monkeypatch.undo()


def test_tma_pre_hook_sets_each_descriptors_block_shape():
    """Catches a pre_hook that gives K/V descriptors BLOCK_M rows or Q/dO descriptors BLOCK_N
    rows (invisible under the interpreter, whose tile is square), or that skips a source, and a
    pointer config launched outside the autotuner with its (unused) descriptors still attached
    (then it is not the pointer kernel compiled without TMA parameters)."""
    x = torch.randn(1, 2, 40, 32)
    descs = {name: smsa_kernel._descriptor(x) for name in ("KD0", "VD0", "KD3", "VD3", "QD", "DOD")}
    cfg = smsa_kernel._config(128, 32, 8, 3, tma=True)
    kwargs = dict(descs, D=32, TMA_OK=True)
    assert smsa_kernel._fixed_config_kwargs(cfg, {}, kwargs) is kwargs
    for name, desc in descs.items():
        rows = 128 if name in ("QD", "DOD") else 32
        assert desc.block_shape == [1, 1, rows, 32], name
    pointer = smsa_kernel._config(128, 32, 8, 3)
    assert smsa_kernel._fixed_config_kwargs(pointer, {}, kwargs) == {"D": 32}


# ---------------------------------------------------------------------------------------------
# Dispatch and validation in aigid.ops
# ---------------------------------------------------------------------------------------------

def _small_cpu(d=16, n_src=2, device="cpu"):
    return _inputs(1, 2, 1, 5, (3, 6, 4, 2, 5)[:n_src], d, device=device)


def test_auto_on_cpu_uses_the_reference():
    q, sources = _small_cpu()
    out = ops.smsa_attention(q, sources)
    assert backends.chosen()["smsa"] == "reference"
    torch.testing.assert_close(out, smsa_attention_reference(q, sources))


@pytest.mark.skipif(not backends.triton_interpret(), reason="needs TRITON_INTERPRET=1 on CPU")
def test_explicit_triton_on_cpu_runs_the_kernel_under_the_interpreter(monkeypatch):
    calls = []
    real = smsa_kernel.smsa_attention_triton
    monkeypatch.setattr(smsa_kernel, "smsa_attention_triton",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    q, sources = _small_cpu()
    out = ops.smsa_attention(q, sources, backend="triton")
    assert calls and backends.chosen()["smsa"] == "triton"
    torch.testing.assert_close(out, smsa_attention_reference(q, sources), atol=ATOL, rtol=RTOL)


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, sources = _small_cpu()
    with pytest.raises(RuntimeError, match="Triton needs CUDA"):
        ops.smsa_attention(q, sources, backend="triton")


def test_force_reference_env(monkeypatch):
    # Pretend Triton may run here, then force the reference.
    monkeypatch.setattr(backends, "triton_usable", lambda device, explicit=False: True)
    monkeypatch.setenv("AIGID_FORCE_REFERENCE", "1")
    q, sources = _small_cpu()
    ops.smsa_attention(q, sources)
    assert backends.chosen()["smsa"] == "reference"


@needs_kernel_device
def test_auto_picks_the_kernel_only_for_supported_inputs(monkeypatch):
    # With Triton usable on this device, auto runs the kernel for supported shapes and falls back
    # to the reference for head dims or source counts the kernel does not take.
    monkeypatch.setattr(backends, "triton_usable", lambda device, explicit=False: True)
    q, sources = _small_cpu(d=16, device=DEV)
    ops.smsa_attention(q, sources)
    assert backends.chosen()["smsa"] == "triton"
    for q, sources in (_small_cpu(d=24, device=DEV), _small_cpu(d=16, n_src=5, device=DEV)):
        out = ops.smsa_attention(q, sources)
        assert backends.chosen()["smsa"] == "reference"
        torch.testing.assert_close(out, smsa_attention_reference(q, sources))


def test_explicit_triton_with_unsupported_head_dim_raises():
    q, sources = _small_cpu(d=24)
    with pytest.raises(ValueError, match="head dim 24 is not supported"):
        ops.smsa_attention(q, sources, backend="triton")


def test_backend_reference_runs_anywhere():
    q, sources = _small_cpu(d=24)
    out = ops.smsa_attention(q, sources, backend="reference")
    assert out.shape == q.shape and backends.chosen()["smsa"] == "reference"


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda q, s: (q[0], s, None), ValueError, "q must be"),
        (lambda q, s: (q, [], None), ValueError, "at least one"),
        (lambda q, s: (q[:, :1].expand(1, 3, 5, 16), [(s[0][0][:, :1].expand(1, 2, 3, 16),
                                                      s[0][1][:, :1].expand(1, 2, 3, 16))], None),
         ValueError, "multiple of key/value heads"),
        (lambda q, s: (q, [(s[0][0], s[0][1][:, :, :2])], None), ValueError, "k and v must"),
        (lambda q, s: (q, [s[0], (s[1][0][..., :8], s[1][1][..., :8])], None), ValueError, "d=16"),
        (lambda q, s: (q, [(s[0][0].double(), s[0][1].double())], None), TypeError, "dtypes"),
        (lambda q, s: (q, s, [None]), ValueError, "entries"),
        (lambda q, s: (q, s, [torch.tensor([1.0]), None]), TypeError, "integers"),
        (lambda q, s: (q, s, [torch.tensor([1, 2]), None]), ValueError, r"\(1,\) tensor"),
    ],
)
def test_validation_errors(make, error, match):
    q, sources = _small_cpu()
    args = make(q, sources)
    with pytest.raises(error, match=match):
        ops.smsa_attention(*args)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 parity at realistic sizes (run with -m gpu on a CUDA machine)
# ---------------------------------------------------------------------------------------------

def _max_err(got, want):
    return (got.float() - want.float()).abs().max().item()


def _naive_low_precision(q, sources, kv_lengths, scale=None):
    """Attention with every matmul rounded to q.dtype and P cast to q.dtype before P·V (as a
    flash kernel does): flash-attention's yardstick for what low precision alone costs."""
    h_q, d = q.shape[1], q.shape[3]
    group = h_q // sources[0][0].shape[1]
    k = torch.cat([k_s for k_s, _ in sources], 2).repeat_interleave(group, dim=1)
    v = torch.cat([v_s for _, v_s in sources], 2).repeat_interleave(group, dim=1)
    valid = torch.cat([
        torch.arange(k_s.shape[2], device=q.device)[None, :]
        < (n if n is not None else torch.full((q.shape[0],), k_s.shape[2], device=q.device))[:, None]
        for (k_s, _), n in zip(sources, kv_lengths)], dim=1)
    empty = ~valid.any(1)
    scores = (q @ k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    scores = scores.float().masked_fill(~(valid | empty[:, None])[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, -1).to(q.dtype) @ v
    return out.masked_fill(empty[:, None, None, None], 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_low_precision_parity(dtype, d):
    # The kernel's error against an fp32 reference must stay within a few times the error of the
    # same reference run in the low precision (flash-attention's test criterion).
    b, h_q, h_kv, l_q, src_lens = 2, 16, 4, 1024, (1024, 777, 300)
    q, sources = _inputs(b, h_q, h_kv, l_q, src_lens, d, dtype=dtype, device="cuda")
    kv_lengths = [None, torch.tensor([777, 500], device="cuda"), torch.tensor([300, 0], device="cuda")]
    grad_out = torch.randn_like(q)
    out, grads = _run(_kernel, q, sources, kv_lengths, grad_out)
    out_lp, grads_lp = _run(_naive_low_precision, q, sources, kv_lengths, grad_out)
    q32 = q.detach().float().requires_grad_()
    src32 = [(k.detach().float().requires_grad_(), v.detach().float().requires_grad_())
             for k, v in sources]
    out32, grads32 = _run(smsa_attention_reference, q32, src32, kv_lengths, grad_out.float())
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _max_err(out, out32) <= 2 * _max_err(out_lp, out32) + 1e-4 * out32.abs().max().item()
    for g, g_lp, g32 in zip(grads, grads_lp, grads32):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert _max_err(g, g32) <= 3 * _max_err(g_lp, g32) + 1e-4 * g32.abs().max().item()


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    q, sources = _inputs(2, 8, 2, 300, (256, 129, 77), 64, device="cuda")
    _assert_matches(q, sources, _lengths([[200, 256], None, [0, 77]], device="cuda"),
                    atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
def test_gpu_auto_dispatch_picks_the_kernel():
    q, sources = _inputs(1, 4, 1, 64, (64, 32), 64, dtype=torch.bfloat16, device="cuda")
    ops.smsa_attention(q, sources)
    assert backends.chosen()["smsa"] == "triton"


@pytest.mark.gpu
def test_gpu_dkdv_split_matches_unsplit_and_repeats_bitwise(monkeypatch):
    """Catches, at UniGenDet's size in bf16 (GROUP 7): a split whose partials race or are
    summed in a varying order (two runs differ), or a split path that drifts from the unsplit
    one by more than the bf16 rounding of a differently ordered fp32 sum."""
    q, sources = _inputs(1, 28, 4, 1024, (64, 1024, 1024), 128, dtype=torch.bfloat16,
                         device="cuda")
    splits = max(2, smsa_kernel._dkdv_splits(q, (64, 1024, 1024), 1, 4, 7))
    grad_out = torch.randn_like(q)
    leaves = [t for pair in sources for t in pair]

    def grads(forced):
        monkeypatch.setattr(smsa_kernel, "_FORCE_DKDV_SPLITS", forced)
        return torch.autograd.grad(smsa_kernel.smsa_attention_triton(q, sources), leaves,
                                   grad_out)

    first, again, unsplit = grads(splits), grads(splits), grads(1)
    for a, b, u in zip(first, again, unsplit):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), u.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA descriptors need sm_90+")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_tma_path_matches_reference(monkeypatch, d):
    """Catches, on Hopper hardware, what the interpreter cannot: compiled TMA kernels whose
    descriptors the driver rejects (strided packed views included) or whose tiles land in the
    wrong shared-memory layout, swizzle or block shape (bf16, d = 64 and 128, ragged valid
    lengths, GQA 4, L off every tile). Every pass must run a USE_TMA config; errors are held to
    test_gpu_low_precision_parity's criterion."""
    calls = _force_tma(monkeypatch)
    b, h_q, h_kv, l_q, src_lens = 2, 16, 4, 1000, (64, 777, 1024)
    kv_lengths = [None, torch.tensor([777, 500], device="cuda"),
                  torch.tensor([1000, 0], device="cuda")]
    q = torch.randn(b, h_q, l_q, d, device="cuda", dtype=torch.bfloat16)
    packed = torch.randn(b, sum(src_lens), 2, h_kv, d, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(q)

    def run(fn, dtype):
        q_, packed_ = q.to(dtype).requires_grad_(), packed.to(dtype).requires_grad_()
        sources, start = [], 0
        for n in src_lens:
            chunk = packed_[:, start:start + n]
            sources.append((chunk[:, :, 0].transpose(1, 2), chunk[:, :, 1].transpose(1, 2)))
            start += n
        out = fn(q_, sources, kv_lengths, None)
        return (out, *torch.autograd.grad(out, [q_, packed_], grad_out.to(dtype)))

    got = run(_kernel, torch.bfloat16)
    assert [c[:2] for c in calls] == [("fwd", True), ("dkdv", True), ("dq", True)]
    low = run(_naive_low_precision, torch.bfloat16)
    exact = run(smsa_attention_reference, torch.float32)
    for g, g_lp, g32 in zip(got, low, exact):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert _max_err(g, g32) <= 3 * _max_err(g_lp, g32) + 1e-4 * g32.abs().max().item()


@pytest.mark.gpu
def test_gpu_memory_has_no_attention_matrix():
    # fwd + bwd at L_q = 4096 over 3 × 4096 keys: a materialised score matrix alone would be
    # B·H_q·L_q·ΣL_s·2 bytes = 1.5 GiB; the kernel's extra memory is O(inputs).
    b, h_q, h_kv, l_q, d = 1, 16, 4, 4096, 128
    q, sources = _inputs(b, h_q, h_kv, l_q, (l_q,) * 3, d, dtype=torch.bfloat16, device="cuda")
    inputs_bytes = sum(t.numel() * t.element_size() for t in [q] + [x for p in sources for x in p])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ops.smsa_attention(q, sources, backend="triton")
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 3 * inputs_bytes, (extra, inputs_bytes)
