"""ops.packed_attention: every backend equals the dense-mask reference, forward and backward."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from aigid import backends, ops
from aigid.kernels.reference import packed_attention_reference
from aigid.ops.packing import PackedLayout, Split
from test_packing import random_samples


pytestmark = pytest.mark.usefixtures("one_thread")


D = 16
EDGE_SAMPLES = [
    [Split(1, "text")],                                               # one split, one token
    [Split(7, "vit")],                                                # a sample that is one image split
    [Split(1, "text"), Split(1, "vae"), Split(1, "vit"), Split(1, "text")],  # length-1 splits
    [Split(3, "text"), Split(5, "vae", hidden=True), Split(9, "vit"), Split(4, "text")],
    [Split(2, "text"), Split(5, "vae", hidden=True)],                 # generation sample
    [Split(2, "text"), Split(5, "vae", hidden=True)],                 # ...twice: grouped
    [Split(11, "text")],                                              # odd-length plain text
]


def qkv(total, h_q, h_kv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(total, h, D, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(h_q), make(h_kv), make(h_kv)


def fwd_bwd(fn, q, k, v):
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def assert_close_all(got, want, **tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract on CPU: one sequence per cu_seqlens slot, native GQA,
    causal bottom-right aligned. Lets the varlen path's gathers be tested without a GPU."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and dropout_p == 0.0
    lens_q, lens_k = cu_q.diff().tolist(), cu_k.diff().tolist()
    assert max(lens_q) == max_q and max(lens_k) == max_k
    outs = []
    for (sq, lq), (sk, lk) in zip(zip(cu_q.tolist(), lens_q), zip(cu_k.tolist(), lens_k)):
        qs, ks, vs = (x[s:s + n].transpose(0, 1) for x, s, n in ((q, sq, lq), (k, sk, lk), (v, sk, lk)))
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else None
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale,
                                                   enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


BACKENDS = {
    "sdpa": lambda q, k, v, layout: ops.packed_attention(q, k, v, layout, backend="sdpa"),
    "varlen": lambda q, k, v, layout: ops._packed_varlen(q, k, v, layout, D ** -0.5, fake_flash_varlen),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("group", [1, 2, 4])
def test_random_layouts_match_reference(backend, group):
    rng = random.Random(100 + group)
    for trial in range(6):
        layout = PackedLayout.build(random_samples(rng))
        q, k, v = qkv(layout.total, 4, 4 // group, seed=trial)
        want = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="reference"), q, k, v)
        got = fwd_bwd(lambda *t: BACKENDS[backend](*t, layout), q, k, v)
        assert_close_all(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_edge_layouts_match_reference(backend):
    layout = PackedLayout.build(EDGE_SAMPLES)
    q, k, v = qkv(layout.total, 4, 2)
    want = fwd_bwd(lambda *t: packed_attention_reference(*t, layout), q, k, v)
    got = fwd_bwd(lambda *t: BACKENDS[backend](*t, layout), q, k, v)
    assert_close_all(got, want, atol=1e-10, rtol=1e-10)


def test_reference_is_dense_masked_softmax():
    """The reference itself, against attention written out as masked softmax(QKᵀ)V."""
    layout = PackedLayout.build(EDGE_SAMPLES[2:5])
    q, k, v = qkv(layout.total, 4, 2)
    out = packed_attention_reference(q, k, v, layout)
    for b in range(layout.num_samples):
        s, e = layout.sample_range(b)
        kk = k[s:e].repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e], kk) * D ** -0.5
        p = scores.masked_fill(~layout.dense_mask(b), float("-inf")).softmax(-1)
        want = torch.einsum("hqk,khd->qhd", p, v[s:e].repeat_interleave(2, dim=1))
        torch.testing.assert_close(out[s:e], want)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_packed_equals_each_sample_alone(backend):
    """The issue's must-show: attention over the pack equals attention over each sample alone."""
    samples = [[Split(5, "text"), Split(6, "vae"), Split(8, "vit"), Split(3, "text")],
               [Split(4, "text"), Split(9, "vae", hidden=True)],
               [Split(5, "text"), Split(6, "vae"), Split(8, "vit"), Split(3, "text")]]
    layout = PackedLayout.build(samples)
    q, k, v = qkv(layout.total, 4, 1, dtype=torch.float32)
    packed = ops.packed_attention(q, k, v, layout, backend=backend)
    for b, sample in enumerate(samples):
        s, e = layout.sample_range(b)
        alone = ops.packed_attention(q[s:e], k[s:e], v[s:e], PackedLayout.build([sample]), backend=backend)
        torch.testing.assert_close(packed[s:e], alone, atol=1e-6, rtol=1e-5)


def test_many_hidden_runs_merge_into_kernel_sources():
    """An image split after > 3 hidden splits has > 4 visible runs: the leading ones are merged."""
    sample = [Split(2, "text"), Split(3, "vae", hidden=True)] * 5 + [Split(4, "vit"), Split(3, "text")]
    layout = PackedLayout.build([sample])
    assert len(layout.visible_runs(0, 10)) == 6
    q, k, v = qkv(layout.total, 2, 1)
    want = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="reference"), q, k, v)
    got = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="sdpa"), q, k, v)
    assert_close_all(got, want, atol=1e-10, rtol=1e-10)


def test_image_splits_through_the_triton_kernel_on_strided_views(monkeypatch):
    """The fused SMSA kernel (interpreter) reads the packed buffers through strided views."""
    if not backends.triton_usable(torch.device("cpu"), explicit=True):
        pytest.skip("needs Triton (TRITON_INTERPRET=1 on CPU)")
    real = ops.smsa_attention
    calls = []

    def via_triton(q, sources, kv_lengths=None, scale=None, *, backend=None):
        calls.append(len(sources))
        return real(q, sources, kv_lengths, scale, backend="triton")
    monkeypatch.setattr(ops, "smsa_attention", via_triton)
    layout = PackedLayout.build([[Split(3, "text"), Split(5, "vae", hidden=True), Split(6, "vit")],
                                 [Split(4, "vae"), Split(2, "text")], [Split(4, "vae"), Split(2, "text")]])
    q, k, v = qkv(layout.total, 4, 2, dtype=torch.float32)
    got = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="sdpa"), q, k, v)
    want = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="reference"), q, k, v)
    assert calls == [1, 2, 1]  # hidden vae; vit over [text] + [itself]; grouped vae of 2 samples
    assert_close_all(got, want, atol=2e-5, rtol=1e-4)


def test_bf16_sdpa_close_to_fp32_reference():
    layout = PackedLayout.build(EDGE_SAMPLES)
    q, k, v = qkv(layout.total, 4, 2, dtype=torch.float32)
    want = packed_attention_reference(q, k, v, layout)
    got = ops.packed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend="sdpa")
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_custom_scale_is_used():
    layout = PackedLayout.build(EDGE_SAMPLES[3:4])
    q, k, v = qkv(layout.total, 2, 2)
    want = packed_attention_reference(q * 0.5 / D ** -0.5, k, v, layout)
    torch.testing.assert_close(ops.packed_attention(q, k, v, layout, scale=0.5, backend="sdpa"), want)


def test_auto_choice_and_announcement(monkeypatch):
    layout = PackedLayout.build(EDGE_SAMPLES[:2])
    q, k, v = qkv(layout.total, 2, 1, dtype=torch.float32)
    ops.packed_attention(q, k, v, layout)
    assert backends.chosen()["attention"] == ("flash-attn" if ops._flash_attn_ready(q) else "sdpa")
    monkeypatch.setenv("AIGID_FORCE_REFERENCE", "1")
    ops.packed_attention(q, k, v, layout)
    assert backends.chosen()["attention"] == "reference"


def test_bad_inputs_raise_clear_errors():
    layout = PackedLayout.build(EDGE_SAMPLES[:2])
    q, k, v = qkv(layout.total, 4, 2)
    with pytest.raises(ValueError, match="tokens"):
        ops.packed_attention(q[:-1], k[:-1], v[:-1], layout)
    with pytest.raises(ValueError, match="multiple"):
        ops.packed_attention(q[:, :3], k, v, layout)
    with pytest.raises(ValueError, match="same shape"):
        ops.packed_attention(q, k, v[:, :1], layout)
    with pytest.raises(TypeError, match="dtypes"):
        ops.packed_attention(q, k.float(), v, layout)
    with pytest.raises(TypeError, match="PackedLayout"):
        ops.packed_attention(q, k, v, [[Split(1, "text")]])
    with pytest.raises(ValueError, match="unknown backend"):
        ops.packed_attention(q, k, v, layout, backend="xformers")
    if not backends.has_flash_attn():
        with pytest.raises(RuntimeError, match="not installed"):
            ops.packed_attention(q, k, v, layout, backend="flash-attn")


@pytest.mark.gpu
@pytest.mark.skipif(not backends.has_flash_attn(), reason="flash-attn is not installed")
def test_flash_attn_matches_reference_on_cuda():
    layout = PackedLayout.build(EDGE_SAMPLES * 3, device="cuda")
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in qkv(layout.total, 8, 2, torch.float32))
    want = fwd_bwd(lambda *t: ops.packed_attention(*(x.float() for x in t), layout, backend="reference"), q, k, v)
    got = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="flash-attn"), q, k, v)
    assert_close_all([g.float() for g in got], [w.float() for w in want], atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_sdpa_backend_with_fused_kernel_on_cuda():
    layout = PackedLayout.build(EDGE_SAMPLES * 3, device="cuda")
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in qkv(layout.total, 8, 2, torch.float32))
    want = fwd_bwd(lambda *t: ops.packed_attention(*(x.float() for x in t), layout, backend="reference"), q, k, v)
    got = fwd_bwd(lambda *t: ops.packed_attention(*t, layout, backend="sdpa"), q, k, v)
    assert_close_all([g.float() for g in got], [w.float() for w in want], atol=3e-2, rtol=3e-2)
