"""The one-program SupCon kernels (``aigid.kernels.supcon_small``) against the reference.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) in fp32 and fp16 (the
interpreter's bf16 ``tl.dot`` is wrong on CPU); bf16 and CUDA-graph capture are ``gpu`` tests.
Each test's docstring names the bug it is there to catch.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aigid.kernels.reference import supcon_bank_loss_reference
from supcon_inputs import supcon_inputs

small = pytest.importorskip("aigid.kernels.supcon_small", reason="needs Triton")

pytestmark = pytest.mark.usefixtures("one_thread")

# CPU tests run on the GPU too when there is one (compiled kernels, GPU tile config)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOG2E = 1.4426950408889634
GRAD_SCALE = 2.5  # upstream grad: catches a kernel that ignores grad_out (or assumes 1)
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
# fp16: the logits are exact fp16 products summed in fp32, so the loss stays fp32-accurate; the
# gradients go through G cast to fp16 (relative error 2^-11 per entry, as flash-attention casts
# P) and are stored in fp16 (another 2^-11): measured ≤ 6.4e-4 of the largest entry, so they
# get 5e-3 (~5 fp16 epsilons) relative to their largest entry.
FP16_LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
FP16_GRAD_RTOL = 5e-3


def _inputs(*args, **kw):
    kw.setdefault("device", DEV)  # these tests run on CUDA when there is one
    return supcon_inputs(*args, **kw)


def _reference(feats, anchors, bank, y, ya, yb, tau: float, grad_scale: float = GRAD_SCALE):
    """Loss and (feats, anchors) grads of the reference, in fp32 from the same input values."""
    f = feats.detach().float().requires_grad_(True)
    a = anchors.detach().float().requires_grad_(True)
    loss = supcon_bank_loss_reference(f, y, bank.float(), yb, a, ya, tau)
    (loss * grad_scale).backward()
    return loss.detach(), f.grad, a.grad


def _kernel(feats, anchors, bank, y, ya, yb, tau: float, grad_scale: float = GRAD_SCALE, *,
            need_feats: bool = True, need_anchors: bool = True,
            grad_dtype: torch.dtype = torch.float32):
    loss, lse2, n_pos = small.small_forward(feats, anchors, bank, y, ya, yb, tau)
    grad_out = torch.tensor(grad_scale, dtype=grad_dtype, device=feats.device)
    gf, ga = small.small_backward(feats, anchors, bank, y, ya, yb, lse2, n_pos, grad_out, tau,
                                  need_feats, need_anchors)
    return loss, lse2, n_pos, gf, ga


def _close_grad(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **FP32_TOL)
    else:
        scale = ref.abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(out.float(), ref, rtol=FP16_GRAD_RTOL,
                                   atol=FP16_GRAD_RTOL * scale + 1e-6)


def _check_parity(n: int, a: int, m: int, d: int, *, tau: float = 0.1,
                  dtype: torch.dtype = torch.float32, **kw):
    args = _inputs(n, a, m, d, dtype=dtype, **kw)
    ref_loss, ref_gf, ref_ga = _reference(*args, tau)
    loss, lse2, n_pos, gf, ga = _kernel(*args, tau)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(gf.float()).all()
    torch.testing.assert_close(loss, ref_loss, **(FP32_TOL if dtype == torch.float32
                                                  else FP16_LOSS_TOL))
    _close_grad(gf, ref_gf, dtype)
    _close_grad(ga, ref_ga, dtype)
    return loss, lse2, n_pos, gf, ga


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------

CASES = {
    # MiraGe's defaults with a small D; D = 40 runs three 16-wide D slices with a masked tail
    "mirage_defaults": dict(n=32, a=2, m=64, d=40),
    # the limits; in fp32 the bank is two 64-key tiles, in fp16 one 128-key tile
    "limits": dict(n=64, a=16, m=128, d=32, n_cls=5),
    "n1_alone": dict(n=1, a=0, m=0, d=7),
    "n1_anchor_positive": dict(n=1, a=2, m=5, d=7, labels="same"),
    "empty_bank": dict(n=9, a=2, m=0, d=33),
    "no_anchors": dict(n=12, a=0, m=10, d=8),
    "odd_d7": dict(n=13, a=3, m=17, d=7, n_cls=3),
    "odd_d33_five_classes": dict(n=20, a=5, m=30, d=33, n_cls=5),
    "bank_65_second_tile_one_key": dict(n=10, a=1, m=65, d=16, n_cls=3),
    "some_rows_without_positives": dict(n=11, a=2, m=6, d=12, labels="some_alone"),
    "large_int64_labels": dict(n=24, a=3, m=40, d=16, labels="large"),
    "all_same_label": dict(n=18, a=2, m=20, d=20, labels="same"),
    "low_temperature": dict(n=32, a=2, m=64, d=40, tau=0.02, n_cls=3),
    # base-2 logits up to 1/τ·log2 e ≈ 289 > 128: exp2 overflows fp32 without the max shift
    "very_low_temperature": dict(n=16, a=2, m=20, d=16, tau=0.005, n_cls=3),
}


@pytest.mark.parametrize("case", CASES)
def test_parity_fp32(case):
    """Loss and both gradients equal the reference in fp32 over the shape zoo. Catches: self not
    excluded from the batch tile; positives not restricted to valid keys (self, padding); padded
    key columns (cols ≥ N/A/M) entering the sums; a D tail read without the ``dd < D`` mask
    (odd D); the second bank tile reading the first tile's labels/columns (``limits``,
    ``bank_65``); labels truncated to 32 bits (``large_int64_labels``: 5 and 2**32 + 5 collide
    when truncated); the G_bᵀ·Q (feats as keys) or G_a·A (anchor keys) term missing from
    grad_feats; a wrong grad_anchors; 1/τ not folded into G; the mean taken over all N rows
    instead of the rows with positives; N_valid counting padded rows; a missing ln 2 or a
    natural-log lse2; the running sum not rescaled when the max grows; no max shift
    (``very_low_temperature`` overflows exp2); N_valid = 0 dividing by zero (``n1_alone``)."""
    kw = dict(CASES[case])
    _check_parity(**kw)


@pytest.mark.parametrize("case", ["mirage_defaults", "limits", "odd_d33_five_classes",
                                  "some_rows_without_positives", "low_temperature"])
def test_parity_fp16(case):
    """fp16 inputs (the 16-bit path: default dot precision, G cast to fp16, gradients stored in
    fp16, one 128-key bank tile at the aligned ``limits`` where fp32 uses two) match the fp32
    reference on the same values. Catches: gradients returned in the wrong dtype (an fp32
    buffer), and errors confined to the 16-bit configuration."""
    kw = dict(CASES[case])
    _check_parity(dtype=torch.float16, **kw)


def test_tests_cover_both_bank_tilings():
    """The interpreter runs the bank as two 64-key tiles for fp32 beyond 64 keys and as one
    128-key tile for aligned 16-bit, as on GPU. Catches: a config change that silently stops
    the CPU tests from exercising one of the two tilings."""
    fp32 = small._config(64, 16, 128, 32, torch.float32, on_gpu=False)
    fp16 = small._config(64, 16, 128, 32, torch.float16, on_gpu=False, aligned=True)
    assert (fp32.block_b, fp32.bank_tiles) == (64, 2)
    assert (fp16.block_b, fp16.bank_tiles) == (128, 1)
    assert small._config(10, 1, 65, 16, torch.float32, on_gpu=False).bank_tiles == 2


def test_row_stride():
    """feats/anchors/bank that are column slices of wider tensors (row stride > D). Catches:
    loads that use D instead of the row stride, or one source's stride for another."""
    n, a, m, d = 12, 3, 20, 9
    feats, anchors, bank, y, ya, yb = _inputs(n, a, m, d, n_cls=3)

    def widen(x: torch.Tensor, pad: int) -> torch.Tensor:
        wide = torch.randn(x.shape[0], d + pad, device=x.device)
        wide[:, :d] = x
        return wide[:, :d]

    f, an, b = widen(feats, 5), widen(anchors, 11), widen(bank, 3)
    assert f.stride(0) != d and an.stride(0) != b.stride(0)
    ref_loss, ref_gf, ref_ga = _reference(feats, anchors, bank, y, ya, yb, 0.1)
    loss, _, _, gf, ga = _kernel(f, an, b, y, ya, yb, 0.1)
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    torch.testing.assert_close(gf, ref_gf, **FP32_TOL)
    torch.testing.assert_close(ga, ref_ga, **FP32_TOL)
    assert gf.is_contiguous() and ga.is_contiguous()


def test_lse2_and_n_pos_convention():
    """``lse2`` is the natural logsumexp × log2(e) on rows with positives and exactly 1e30 on the
    others; ``n_pos`` counts positives (self excluded) as int32 — the contract shared with the
    tiled path. Catches: a natural-log lse stored, the sentinel missing (a real lse stored for
    rows without positives), self counted as a positive, wrong dtypes."""
    n, a, m, d, tau = 11, 2, 6, 12, 0.1
    feats, anchors, bank, y, ya, yb = _inputs(n, a, m, d, labels="some_alone")
    loss, lse2, n_pos = small.small_forward(feats, anchors, bank, y, ya, yb, tau)
    keys = torch.cat([feats, anchors, bank])
    logits = feats @ keys.T / tau
    logits[:, :n].fill_diagonal_(float("-inf"))
    pos = y[:, None] == torch.cat([y, ya, yb])[None, :]
    pos[:, :n].fill_diagonal_(False)
    want_npos = pos.sum(1).to(torch.int32)
    assert lse2.dtype == torch.float32 and n_pos.dtype == torch.int32
    assert torch.equal(n_pos, want_npos)
    has = want_npos > 0
    assert has.any() and (~has).any()
    torch.testing.assert_close(lse2[has], torch.logsumexp(logits, 1)[has] * LOG2E, **FP32_TOL)
    assert (lse2[~has] == 1e30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_row_has_positives(dtype):
    """No row has a positive: the loss is exactly 0 and both gradients exactly 0 (no NaN from
    0/0 in the mean or in 1/n_pos, no leak from the 1e30 sentinel). Catches: dividing by N_valid
    without the max(·, 1) guard, and a backward that does not zero rows without positives."""
    args = _inputs(10, 2, 9, 9, labels="distinct", dtype=dtype)
    loss, lse2, n_pos, gf, ga = _kernel(*args, 0.1)
    assert loss.item() == 0.0
    assert (n_pos == 0).all() and (lse2 == 1e30).all()
    assert (gf == 0).all() and (ga == 0).all()
    ref_loss, ref_gf, _ = _reference(*args, 0.1)
    assert ref_loss.item() == 0.0 and (ref_gf == 0).all()


@pytest.mark.parametrize("need_feats,need_anchors", [(True, False), (False, True),
                                                     (False, False)])
def test_need_flags(need_feats, need_anchors):
    """Only the requested gradients are computed; the skipped output is None; the computed one is
    unchanged. Catches: the flags wired to the wrong output, a skipped output still returned or
    allocated, and a computed one depending on the other flag."""
    args = _inputs(20, 5, 30, 33, n_cls=5)
    _, ref_gf, ref_ga = _reference(*args, 0.1)
    _, _, _, gf, ga = _kernel(*args, 0.1, need_feats=need_feats, need_anchors=need_anchors)
    assert (gf is None) != need_feats and (ga is None) != need_anchors
    if need_feats:
        torch.testing.assert_close(gf, ref_gf, **FP32_TOL)
    if need_anchors:
        torch.testing.assert_close(ga, ref_ga, **FP32_TOL)


@pytest.mark.parametrize("need_feats,need_anchors", [(True, True), (True, False),
                                                     (False, True)])
def test_inputs_not_written(need_feats, need_anchors):
    """Forward and backward leave every input untouched. Catches: a skipped output's stand-in
    pointer (feats) being written when its NEED flag is ignored, and stores that overrun the
    (N, D) / (A, D) outputs."""
    for shape in ((13, 3, 17, 7), (12, 0, 10, 8)):  # with anchors, and with none (a stand-in)
        args = _inputs(*shape, n_cls=3)
        before = [t.clone() for t in args]
        _kernel(*args, 0.1, need_feats=need_feats, need_anchors=need_anchors)
        for t, t0 in zip(args, before):
            assert torch.equal(t, t0)


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_grad_out_any_float_dtype(grad_dtype):
    """``grad_out`` is a 0-dim tensor of any float dtype, read through its pointer. Catches: the
    pointer read with the wrong element type (e.g. fp64 bits read as fp32) and a missing cast."""
    args = _inputs(32, 2, 64, 40)
    _, ref_gf, ref_ga = _reference(*args, 0.1, grad_scale=-1.5)
    _, _, _, gf, ga = _kernel(*args, 0.1, grad_scale=-1.5, grad_dtype=grad_dtype)
    torch.testing.assert_close(gf, ref_gf, **FP32_TOL)
    torch.testing.assert_close(ga, ref_ga, **FP32_TOL)


def test_small_fits_boundaries():
    """The limits are inclusive, zero anchors/bank are fine, N = 0 and oversize are refused.
    Catches: off-by-one at the limits (e.g. ``<`` for ``<=``), a path accepting N = 0, or an
    unaligned D admitted with two bank tiles (they spill on sm_80)."""
    L, A, M = small.SMALL_MAX_ROWS, small.SMALL_MAX_ANCHORS, small.SMALL_MAX_BANK
    assert L >= 32 and M >= 64 and A >= 2
    assert small.small_fits(L, A, M, 768)
    assert small.small_fits(1, 0, 0, 1)
    assert small.small_fits(32, 2, 64, 1000)
    assert not small.small_fits(32, 2, 65, 1000)  # unaligned D: one bank tile at most
    assert small.small_fits(32, 2, small.SMALL_MAX_BANK, 1024)
    assert not small.small_fits(0, 0, 0, 8)
    assert not small.small_fits(L + 1, 0, 0, 8)
    assert not small.small_fits(1, A + 1, 0, 8)
    assert not small.small_fits(1, 0, M + 1, 8)
    assert not small.small_fits(1, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Launch discipline: one kernel each, no host sync, only torch.empty around it
# --------------------------------------------------------------------------------------------


class _AtenLog(TorchDispatchMode):
    """Records the aten ops issued outside kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _launch_audit(monkeypatch):
    """Counts Triton launches (grids included), forbids host syncs, logs the torch ops issued
    outside launches (the interpreter's own host copies inside a launch are not logged)."""
    launches: list[tuple[str, tuple]] = []
    kernel_type = type(small._small_fwd_kernel)
    assert type(small._small_bwd_kernel) is kernel_type
    original_run = kernel_type.run
    log = _AtenLog()

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((getattr(self, "__name__", repr(self)), tuple(grid)))
        log.paused = True
        try:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            log.paused = False

    def no_sync(*_a, **_k):
        raise AssertionError("host sync in the small SupCon path")

    monkeypatch.setattr(kernel_type, "run", run)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    with log:
        yield launches, log.ops


def test_one_launch_each_no_host_sync(monkeypatch):
    """The forward is exactly one launch on grid (1,), the backward exactly one, and around them
    only ``torch.empty`` runs (no .item()/.tolist()/bool(tensor), no torch epilogue such as a
    mean or a where). Catches: a host sync or torch op sneaking in (breaks CUDA-graph capture
    and costs the launches this path exists to save), a second kernel, a grid > 1."""
    args = _inputs(32, 2, 64, 40)
    grad_out = torch.tensor(GRAD_SCALE, device=DEV)
    with _launch_audit(monkeypatch) as (launches, ops):
        loss, lse2, n_pos = small.small_forward(*args, 0.1)
        assert [g for _, g in launches] == [(1,)]
        small.small_backward(*args, lse2, n_pos, grad_out, 0.1, True, True)
        assert [g for _, g in launches] == [(1,), (1,)]
        small.small_backward(*args, lse2, n_pos, grad_out, 0.1, False, True)
        small.small_backward(*args, lse2, n_pos, grad_out, 0.1, True, False)
        assert len(launches) == 4
        small.small_backward(*args, lse2, n_pos, grad_out, 0.1, False, False)
        assert len(launches) == 4  # nothing asked for: nothing launched
    assert set(ops) <= {"aten.empty.memory_format"}, ops
    assert ops.count("aten.empty.memory_format") == 3 + 2 + 1 + 1


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------


def _cuda_inputs(n, a, m, d, dtype, **kw):
    return _inputs(n, a, m, d, dtype=dtype, device=torch.device("cuda"), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 2, 64, 768), (64, 16, 128, 768), (64, 16, 128, 1000),
                                   (7, 0, 0, 33)])
def test_gpu_parity(shape, dtype):
    """Compiled kernels (wgmma on sm_90a, mma.sync on sm_80, IEEE FMA for fp32) match the
    reference at MiraGe's shape, the limits and unaligned D. Catches: GPU-only layout/config
    bugs the interpreter cannot see (bf16 dots, vectorised unaligned loads)."""
    args = _cuda_inputs(*shape, dtype, n_cls=3)
    ref_loss, ref_gf, ref_ga = _reference(*args, 0.07)
    loss, _, _, gf, ga = _kernel(*args, 0.07)
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    grad_rtol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 has 8 mantissa bits
    for out, ref in ((gf, ref_gf), (ga, ref_ga)):
        assert out.dtype == dtype
        scale = ref.abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(out.float(), ref, rtol=grad_rtol,
                                   atol=grad_rtol * scale + 1e-6)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Forward + backward captured in a CUDA graph replay to the eager result, with new inputs
    copied into the captured buffers. Catches: anything that syncs or allocates data-dependent
    shapes during capture (capture raises), or a kernel reading stale host-side values."""
    n, a, m, d = 32, 2, 64, 768
    args = _cuda_inputs(n, a, m, d, torch.bfloat16)
    grad_out = torch.tensor(GRAD_SCALE, device="cuda")

    def step():
        loss, lse2, n_pos = small.small_forward(*args, 0.07)
        gf, ga = small.small_backward(*args, lse2, n_pos, grad_out, 0.07, True, True)
        return loss, gf, ga

    step()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new = _cuda_inputs(n, a, m, d, torch.bfloat16, seed=1)
    for buf, val in zip(args, new):
        buf.copy_(val)
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
