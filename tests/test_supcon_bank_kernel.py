"""The fused SupCon memory-bank kernel against its plain-PyTorch reference, and its dispatch.

On CPU the Triton path runs under ``TRITON_INTERPRET=1`` (set by conftest) at small fp32 sizes;
bf16 and large-size parity need a GPU (the interpreter mishandles bf16 ``tl.dot``) and are
marked ``gpu``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigid import backends, ops
from aigid.kernels.reference import supcon_bank_loss_reference
from supcon_inputs import supcon_inputs as _inputs

supcon_bank = pytest.importorskip("aigid.kernels.supcon_bank", reason="needs Triton")

CPU = torch.device("cpu")
FP32_TOL = dict(rtol=1e-4, atol=1e-5)


def _run(fn, feats, anchors, bank, y, ya, yb, tau, grad_scale=1.0, **kw):
    f = feats.detach().clone().requires_grad_(True)
    a = anchors.detach().clone().requires_grad_(True)
    b = bank.detach().clone().requires_grad_(True)
    loss = fn(f, y, b, yb, a, ya, tau, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), f.grad, a.grad, b.grad


def _check_parity(n, a, m, d, *, tau=0.1, key_splits=None, bwd_chunk=None, grad_scale=1.0,
                  path="auto", **kw):
    args = _inputs(n, a, m, d, **kw)
    ref = _run(supcon_bank_loss_reference, *args, tau, grad_scale)
    out = _run(supcon_bank.supcon_bank_loss_triton, *args, tau, grad_scale, key_splits=key_splits,
               bwd_chunk=bwd_chunk, path=path)
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], ref[0], **FP32_TOL)
    torch.testing.assert_close(out[1], ref[1], **FP32_TOL)
    if a:
        torch.testing.assert_close(out[2], ref[2], **FP32_TOL)
    assert out[3] is None and ref[3] is None  # the bank is detached
    return out


CASES = {
    "basic": dict(n=8, a=2, m=12, d=16),
    "n1_with_anchor_positive": dict(n=1, a=2, m=5, d=7, labels="same"),
    "n1_alone": dict(n=1, a=0, m=0, d=7),
    "empty_bank": dict(n=9, a=2, m=0, d=33),
    "no_anchors": dict(n=12, a=0, m=10, d=8),
    "odd_d7": dict(n=13, a=3, m=17, d=7, n_cls=3),
    "odd_d33_five_classes": dict(n=20, a=5, m=30, d=33, n_cls=5),
    "some_rows_without_positives": dict(n=11, a=2, m=6, d=12, labels="some_alone"),
    "no_row_has_positives": dict(n=10, a=2, m=9, d=9, labels="distinct"),
    "all_same_label": dict(n=18, a=2, m=20, d=20, labels="same"),
    "arbitrary_label_ids": dict(n=14, a=4, m=11, d=10, labels="large"),
    "low_temperature": dict(n=10, a=2, m=25, d=17, tau=0.02),
    "splits_straddle_sources": dict(n=20, a=3, m=40, d=18, n_cls=3, key_splits=3),
    "many_splits_upstream_grad": dict(n=17, a=2, m=33, d=24, key_splits=5, grad_scale=2.5),
    # the backward's gradient weights in several key chunks per source (16 = one tile wide;
    # 5 = narrower than a tile, so chunk edges fall inside tiles)
    "bwd_chunks_of_one_tile": dict(n=37, a=3, m=50, d=20, n_cls=3, bwd_chunk=16),
    "bwd_chunks_inside_tiles": dict(n=19, a=7, m=23, d=9, bwd_chunk=5, grad_scale=0.5),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parity_fp32(case):
    _check_parity(**CASES[case])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parity_fp32_small_path_through_autograd(case, monkeypatch):
    """Catches the autograd function mis-wiring the one-program path: its lse2/n_pos saved
    under the tiled convention, the upstream gradient or the anchors' gradient dropped, or
    ``path="small"`` silently running the tiled kernels."""
    calls = []
    for name in ("small_forward", "small_backward"):
        real = getattr(supcon_bank, name)
        monkeypatch.setattr(supcon_bank, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    _check_parity(**CASES[case], path="small")
    assert calls == ["small_forward", "small_backward"]


def test_path_choice_and_errors(monkeypatch):
    """Catches "auto" taking the small path off CUDA (the interpreter tests would then never
    cover the tiled kernels), and ``path="small"`` accepting a shape it cannot hold."""
    calls = []
    monkeypatch.setattr(supcon_bank, "small_forward", lambda *a: calls.append(1))
    feats, anchors, bank, y, ya, yb = _inputs(8, 2, 10, 12)
    supcon_bank.supcon_bank_loss_triton(feats, y, bank, yb, anchors, ya, 0.1)
    assert calls == []
    big_bank, yb_big = torch.zeros(129, 12), torch.zeros(129, dtype=torch.long)
    with pytest.raises(ValueError, match="M ≤ 128"):
        supcon_bank.supcon_bank_loss_triton(feats, y, big_bank, yb_big, anchors, ya, 0.1,
                                            path="small")
    with pytest.raises(ValueError, match="path must be"):
        supcon_bank.supcon_bank_loss_triton(feats, y, bank, yb, anchors, ya, 0.1, path="fast")


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 24), a=st.integers(0, 4), m=st.integers(0, 24), d=st.integers(1, 40),
       n_cls=st.integers(1, 5), splits=st.sampled_from([None, 2]),
       chunk=st.sampled_from([None, 3, 16]), seed=st.integers(0, 2**16))
def test_parity_random_shapes(n, a, m, d, n_cls, splits, chunk, seed):
    _check_parity(n, a, m, d, n_cls=n_cls, key_splits=splits, bwd_chunk=chunk, seed=seed)


@pytest.mark.parametrize("chunk", [None, 16], ids=["one_chunk", "chunks"])
def test_parity_fp16_interpreter(chunk):
    """Catches a 16-bit tiled path that breaks where fp32 works: GEMMs mixing fp16 weights with
    fp32 operands, gradients returned in the wrong dtype, a weight tile stored unscaled or
    cast wrongly. Tolerance 2e-3 of the largest entry: G is stored in fp16 (~5e-4 relative)
    before its GEMMs, as flash-attention stores P, and the gradients come back in fp16."""
    args = _inputs(40, 2, 45, 24, n_cls=3, dtype=torch.float16)
    ref = _run(supcon_bank_loss_reference, *[t.float() if t.is_floating_point() else t
                                             for t in args], 0.1)
    out = _run(supcon_bank.supcon_bank_loss_triton, *args, 0.1, bwd_chunk=chunk)
    assert out[1].dtype == out[2].dtype == torch.float16
    for o, r in zip(out[:3], ref[:3]):
        torch.testing.assert_close(o.float(), r, rtol=2e-3, atol=2e-3 * r.abs().max().item())


def test_no_positives_gives_attached_zero():
    loss, gf, ga, gb = _check_parity(6, 2, 5, 8, labels="distinct")
    assert loss.item() == 0.0
    assert torch.count_nonzero(gf) == 0 and torch.count_nonzero(ga) == 0 and gb is None


def test_bank_gets_no_gradient_and_is_untouched():
    feats, anchors, bank, y, ya, yb = _inputs(8, 2, 10, 12, labels="same")
    bank = bank.requires_grad_(True)
    before = bank.detach().clone()
    f = feats.requires_grad_(True)
    loss = supcon_bank.supcon_bank_loss_triton(f, y, bank, yb, anchors, ya, 0.1)
    loss.backward()
    assert bank.grad is None
    assert f.grad is not None and torch.count_nonzero(f.grad) > 0
    torch.testing.assert_close(bank.detach(), before, rtol=0, atol=0)


def test_only_anchors_require_grad():
    feats, anchors, bank, y, ya, yb = _inputs(9, 3, 7, 11, n_cls=2)
    a_ref = anchors.clone().requires_grad_(True)
    supcon_bank_loss_reference(feats, y, bank, yb, a_ref, ya, 0.1).backward()
    a_tri = anchors.clone().requires_grad_(True)
    supcon_bank.supcon_bank_loss_triton(feats, y, bank, yb, a_tri, ya, 0.1).backward()
    torch.testing.assert_close(a_tri.grad, a_ref.grad, **FP32_TOL)


def test_anchor_gradient_keeps_anchor_dtype():
    feats, anchors, bank, y, ya, yb = _inputs(6, 2, 4, 8, labels="same")
    a64 = anchors.double().requires_grad_(True)
    f = feats.clone().requires_grad_(True)
    supcon_bank.supcon_bank_loss_triton(f, y, bank, yb, a64, ya, 0.1).backward()
    a_ref = anchors.double().requires_grad_(True)
    supcon_bank_loss_reference(feats, y, bank, yb, a_ref, ya, 0.1).backward()
    assert a64.grad.dtype == torch.float64 and f.grad.dtype == torch.float32
    torch.testing.assert_close(a64.grad, a_ref.grad, **FP32_TOL)


def test_rejects_unsupported_dtype():
    feats, anchors, bank, y, ya, yb = _inputs(4, 1, 2, 8)
    with pytest.raises(TypeError):
        supcon_bank.supcon_bank_loss_triton(feats.double(), y, bank, yb, anchors, ya, 0.1)


# ---- dispatch through aigid.ops ------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into the kernel and into the reference made through aigid.ops."""
    calls = {"triton": 0, "reference": 0}
    kernel_fn = supcon_bank.supcon_bank_loss_triton
    ref_fn = ops.reference.supcon_bank_loss_reference

    def kernel_spy(*args, **kwargs):
        calls["triton"] += 1
        return kernel_fn(*args, **kwargs)

    def ref_spy(*args, **kwargs):
        calls["reference"] += 1
        return ref_fn(*args, **kwargs)

    monkeypatch.setattr(supcon_bank, "supcon_bank_loss_triton", kernel_spy)
    monkeypatch.setattr(ops.reference, "supcon_bank_loss_reference", ref_spy)
    monkeypatch.delenv("AIGID_FORCE_REFERENCE", raising=False)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_on_cpu_uses_reference(spy):
    args = _inputs(5, 1, 3, 8)
    ops.supcon_bank_loss(*_op_order(args), temperature=0.1)
    ops.supcon_bank_loss(*_op_order(args), temperature=0.1, backend="auto")
    assert spy == {"triton": 0, "reference": 2}
    assert backends.chosen()["supcon"] == "reference"


def test_explicit_triton_runs_kernel(spy):
    args = _inputs(7, 2, 5, 9, n_cls=3)
    out = ops.supcon_bank_loss(*_op_order(args), temperature=0.1, backend="triton")
    assert spy == {"triton": 1, "reference": 0}
    assert backends.chosen()["supcon"] == "triton"
    ref = supcon_bank_loss_reference(*_op_order(args), 0.1)
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_force_reference_env(spy, monkeypatch):
    monkeypatch.setenv("AIGID_FORCE_REFERENCE", "1")
    ops.supcon_bank_loss(*_op_order(_inputs(5, 1, 3, 8)), temperature=0.1)
    assert spy == {"triton": 0, "reference": 1}


def test_backend_reference_is_honoured(spy):
    ops.supcon_bank_loss(*_op_order(_inputs(5, 1, 3, 8)), temperature=0.1, backend="reference")
    assert spy == {"triton": 0, "reference": 1}


def test_auto_float64_keeps_reference(spy):
    feats, anchors, bank, y, ya, yb = _inputs(5, 1, 3, 8, dtype=torch.float64)
    ops.supcon_bank_loss(feats, y, bank, yb, anchors, ya, temperature=0.1)
    assert spy["triton"] == 0


def _op_order(args):
    feats, anchors, bank, y, ya, yb = args
    return feats, y, bank, yb, anchors, ya


# ---- GPU: bf16 and large sizes ---------------------------------------------------------------

BF16_RTOL = 2e-2


def _gpu_parity(n, a, m, d, dtype, *, tau=0.07, key_splits=None, path="auto", bwd_chunk=None,
                **kw):
    dev = torch.device("cuda")
    args = _inputs(n, a, m, d, device=dev, dtype=dtype, **kw)
    ref_args = [t.float() if t.is_floating_point() else t for t in args]
    ref = _run(supcon_bank_loss_reference, *ref_args, tau)
    out = _run(supcon_bank.supcon_bank_loss_triton, *args, tau, key_splits=key_splits, path=path,
               bwd_chunk=bwd_chunk)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == dtype and (a == 0 or out[2].dtype == dtype)
    if dtype == torch.float32:
        tol = lambda r: dict(rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))  # noqa: E731
    else:
        tol = lambda r: dict(rtol=BF16_RTOL, atol=BF16_RTOL * r.abs().max().item())  # noqa: E731
    torch.testing.assert_close(out[0], ref[0], **tol(ref[0]))
    torch.testing.assert_close(out[1].float(), ref[1], **tol(ref[1]))
    if a:
        torch.testing.assert_close(out[2].float(), ref[2], **tol(ref[2]))
    assert out[3] is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", ["basic", "odd_d33_five_classes", "empty_bank",
                                  "some_rows_without_positives", "no_row_has_positives",
                                  "n1_with_anchor_positive", "splits_straddle_sources"])
@pytest.mark.parametrize("path", ["tiled", "small"])
def test_gpu_parity_small(case, dtype, path):
    """Compiled kernels (wgmma / mma.sync, bf16) at small sizes, through both paths: "auto"
    would send every one of these to the one-program path and leave the tiled kernels'
    small-size edges (tails, splits that straddle sources) untested on hardware."""
    kw = dict(CASES[case])
    kw.pop("grad_scale", None)
    _gpu_parity(dtype=dtype, path=path, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [768, 1000])
def test_gpu_parity_bf16_wide_d(d):
    _gpu_parity(96, 2, 300, d, torch.bfloat16, n_cls=2)


@pytest.mark.gpu
def test_gpu_parity_bf16_backward_in_chunks():
    """Catches what only CUDA exercises in the chunked backward: torch.mm's fp32-out overload on
    strided column slices of the bf16 weight buffer, and chunk offsets over batch and bank
    (300-column chunks, not a multiple of the 128-wide tiles)."""
    _gpu_parity(512, 2, 1500, 768, torch.bfloat16, n_cls=3, path="tiled", bwd_chunk=300)


@pytest.mark.gpu
def test_gpu_parity_large_bf16():
    _gpu_parity(1024, 2, 4096, 768, torch.bfloat16, n_cls=2)


@pytest.mark.gpu
def test_gpu_parity_large_bf16_forced_splits():
    _gpu_parity(256, 2, 4096, 768, torch.bfloat16, n_cls=5, key_splits=16)


@pytest.mark.gpu
def test_gpu_auto_dispatch_picks_triton(spy):
    args = _inputs(64, 2, 128, 64, device=torch.device("cuda"), dtype=torch.bfloat16)
    ops.supcon_bank_loss(*_op_order(args), temperature=0.07)
    assert spy == {"triton": 1, "reference": 0}
