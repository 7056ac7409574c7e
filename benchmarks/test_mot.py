"""One MoT layer, forward + backward, on a packed mix of detection and generation samples.

Providers (same layer weights, same packed input, same output gradient; one run):

* ``ours``: :class:`aigid.models.unigendet.mot.MoTLayer` with ``packed_attention`` on automatic choice
  (flash-attn varlen or the split-wise path with the fused SMSA kernel on CUDA; split-wise SDPA
  on CPU): no dense mask, native GQA, experts routed by index over the whole pack.
* ``bagel_loop``: the plain per-token-type loop — per sample and per token type the expert
  projections run separately; attention is one SDPA call per sample on a dense 0/-inf mask with
  K/V repeated to all heads (BAGEL's training attention).
* ``bagel_packed``: BAGEL's actual layer — experts routed over the whole pack (as ours) with the
  same per-sample dense-mask SDPA and expanded K/V (``packed_attention(backend="reference")``).
* ``flex``: our layer with ``flex_attention`` over the whole pack and a block mask built once per
  layout (outside the timed region). CUDA: compiled; CPU: eager (unfused: it materialises the
  scores; it runs, so it is measured, but it is not flex's intended mode — see extra_info).

Workload. CPU: a small width (hidden 256, 8/2 heads of 32, FFN 512), fp32, 4 detection samples
(text 32 + VAE 64 + ViT 64 + text 16) and 2 generation samples (text 24 + hidden VAE 64).
CUDA (``gpu``): the 7B layer (hidden 3584, 28/4 heads of 128, FFN 18944), bf16, ~12.5k tokens:
8 detection samples (text 24-64, VAE 256, ViT 729, text 8-40) and 4 generation samples
(text 16-64, hidden VAE 1024), text lengths drawn with a fixed seed.

``extra_info``: device, tokens, tokens/s, mean ms, and ``ours_speedup`` (provider mean / ours
mean, measured in the same run) on each peer.
"""
from __future__ import annotations

import platform
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from aigid import backends, ops
from aigid.models.unigendet.mot import MoTConfig, MoTLayer
from aigid.models.unigendet.rope import RotaryEmbedding, apply_rotary
from aigid.ops.packing import PackedLayout, Split

from _report import record_comparison

CUDA = torch.cuda.is_available()
_means: dict[tuple[str, str], float] = {}  # (workload, provider) -> mean seconds


def _cpu_workload():
    cfg = MoTConfig(hidden_size=256, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=32,
                    intermediate_size=512, vocab_size=16)
    det = [Split(32, "text"), Split(64, "vae"), Split(64, "vit"), Split(16, "text")]
    gen = [Split(24, "text"), Split(64, "vae", hidden=True)]
    return cfg, [det, gen, det, det, gen, det], torch.float32, torch.device("cpu")


def _cuda_workload():
    cfg = MoTConfig.named("bagel-7b")
    rng = random.Random(0)
    samples = []
    for i in range(12):
        if i % 3 == 2:
            samples.append([Split(rng.randint(16, 64), "text"), Split(1024, "vae", hidden=True)])
        else:
            samples.append([Split(rng.randint(24, 64), "text"), Split(256, "vae"), Split(729, "vit"),
                            Split(rng.randint(8, 40), "text")])
    return cfg, samples, torch.bfloat16, torch.device("cuda")


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

def bagel_loop_forward(layer: MoTLayer, x: torch.Tensor, layout: PackedLayout, rope) -> torch.Tensor:
    """Per sample, per token type: separate expert projections; dense-mask SDPA per sample with
    K/V repeated to all heads. Same maths as MoTLayer, no index routing over the pack."""
    attn = layer.self_attn
    cos, sin = rope
    group = attn.num_heads // attn.num_kv_heads
    outs = []
    for b in range(layout.num_samples):
        s0, _ = layout.sample_range(b)
        qs, ks, vs, spans = [], [], [], []
        for i, sp in enumerate(layout.samples[b]):
            s, e = layout.split_range(b, i)
            sfx = "_moe_gen" if sp.kind == "vae" else ""
            h = getattr(layer, f"input_layernorm{sfx}")(x[s:e])
            q = getattr(attn, f"q_proj{sfx}")(h).unflatten(-1, (attn.num_heads, -1))
            k = getattr(attn, f"k_proj{sfx}")(h).unflatten(-1, (attn.num_kv_heads, -1))
            v = getattr(attn, f"v_proj{sfx}")(h).unflatten(-1, (attn.num_kv_heads, -1))
            q, k = getattr(attn, f"q_norm{sfx}")(q), getattr(attn, f"k_norm{sfx}")(k)
            qs.append(apply_rotary(q, cos[s:e], sin[s:e]))
            ks.append(apply_rotary(k, cos[s:e], sin[s:e]))
            vs.append(v)
            spans.append((s - s0, e - s0, sfx))
        q, k, v = (torch.cat(t).transpose(0, 1) for t in (qs, ks, vs))
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(b)).transpose(0, 1).flatten(1)
        for s, e, sfx in spans:
            xs = x[s0 + s:s0 + e] + getattr(attn, f"o_proj{sfx}")(o[s:e])
            outs.append(xs + getattr(layer, f"mlp{sfx}")(getattr(layer, f"post_attention_layernorm{sfx}")(xs)))
    return torch.cat(outs)


def flex_attention_for(layout: PackedLayout, device: torch.device):
    """A packed-attention callable on flex_attention with a block mask for this layout."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    split_id, sample_id, hidden, causal = [], [], [], []
    g = 0
    for b, sample in enumerate(layout.samples):
        for sp in sample:
            split_id += [g] * sp.length
            sample_id += [b] * sp.length
            hidden.append(sp.hidden)
            causal.append(sp.causal)
            g += 1
    split_id, sample_id, hidden, causal = (torch.tensor(t, device=device)
                                           for t in (split_id, sample_id, hidden, causal))

    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = split_id[q_idx], split_id[kv_idx]
        earlier = (sk < sq) & ~hidden[sk]
        same = (sk == sq) & (~causal[sq] | (kv_idx <= q_idx))
        return (sample_id[q_idx] == sample_id[kv_idx]) & (earlier | same)

    t = layout.total
    block_mask = create_block_mask(mask_mod, None, None, t, t, device=device)
    fn = torch.compile(flex_attention) if device.type == "cuda" else flex_attention

    def attention(q, k, v, _layout):
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        return fn(q, k, v, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)
    return attention


# ---------------------------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------------------------

def _setup(workload):
    cfg, samples, dtype, device = workload()
    torch.manual_seed(0)
    layer = MoTLayer(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # Qwen-like scales so that the softmax is not degenerate
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    layout = PackedLayout.build(samples, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(layout.total, cfg.hidden_size, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=g)
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(layout.position_ids, dtype)
    return cfg, layer, layout, x, grad, rope


def _attention_fn(provider, layout):
    if provider == "ours":
        return None  # automatic choice
    if provider in ("sdpa", "bagel_packed"):
        return "sdpa" if provider == "sdpa" else "reference"
    return flex_attention_for(layout, layout.device)


MOT_MEANS = {
    "ours": "aigid's MoTLayer / packed_attention, automatic backend",
    "bagel_loop": "per-sample, per-token-type loop + dense-mask SDPA",
    "bagel_packed": "BAGEL's layer: pack-wide experts + per-sample dense-mask SDPA",
    "sdpa": "split-wise SDPA (no flash-attn)",
    "flex": "flex_attention with a block mask (eager on CPU)",
}


def _record(benchmark, name, provider, layout, dtype, cfg, threads):
    record_comparison(benchmark, case=f"mot-{name}", name=provider, ours=provider == "ours",
                      means=MOT_MEANS[provider])
    mean = benchmark.stats.stats.mean
    _means[(name, provider)] = mean
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
                torch=torch.__version__, dtype=str(dtype), tokens=layout.total, samples=layout.num_samples,
                hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, ffn=cfg.intermediate_size, cpu_threads=threads,
                mean_ms=round(mean * 1e3, 3), tokens_per_s=round(layout.total / mean, 1))
    if provider == "ours":
        info["attention"] = backends.chosen().get("attention")
    elif (name, "ours") in _means:
        info["ours_speedup"] = round(mean / _means[(name, "ours")], 3)


def _timed(benchmark, name, workload, provider, rounds, attention_only):
    cfg, layer, layout, x, grad, rope = _setup(workload)
    # On CPU one thread: the CI machines are shared and oversubscribed threads make noise, not data.
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            if attention_only:
                g = torch.Generator(device=layout.device).manual_seed(2)
                qkv = [torch.randn(layout.total, h, cfg.head_dim, device=layout.device, dtype=x.dtype,
                                   generator=g).requires_grad_()
                       for h in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)]
                grad = torch.randn_like(qkv[0])
                attention = _attention_fn(provider, layout)
                if callable(attention):
                    forward = lambda: attention(*qkv, layout)  # noqa: E731
                else:
                    forward = lambda: ops.packed_attention(*qkv, layout, backend=attention)  # noqa: E731
                reference = lambda: ops.packed_attention(*qkv, layout, backend="reference")  # noqa: E731
                inputs = qkv
            else:
                if provider == "bagel_loop":
                    forward = lambda: bagel_loop_forward(layer, x, layout, rope)  # noqa: E731
                else:
                    attention = _attention_fn(provider, layout)
                    forward = lambda: layer(x, layout, rope, attention_backend=attention)  # noqa: E731
                reference = lambda: layer(x, layout, rope, attention_backend="reference")  # noqa: E731
                inputs = [x]
            try:
                out = forward()
            except Exception as e:  # flex without a usable backend here: say why, never hide it
                if provider == "flex":
                    pytest.skip(f"flex_attention does not run here: {type(e).__name__}: {e}")
                raise
            with torch.no_grad():  # parity before timing: every provider computes the same thing
                want = reference()
            tol = 5e-2 if x.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(out.detach().float(), want.float(), atol=tol, rtol=tol)

            def step():
                layer.zero_grad(set_to_none=True)
                for t in inputs:
                    t.grad = None
                forward().backward(grad)
                if CUDA:
                    torch.cuda.synchronize()
            benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    finally:
        torch.set_num_threads(threads)
    _record(benchmark, name, provider, layout, x.dtype, cfg, 1 if not CUDA else None)


LAYER_PROVIDERS = ["ours", "bagel_loop", "bagel_packed", "flex"]
ATTENTION_PROVIDERS = ["ours", "sdpa", "bagel_packed", "flex"]
# On CPU the automatic choice ("ours") already is the split-wise sdpa path: no separate case.
CPU_ATTENTION_PROVIDERS = [p for p in ATTENTION_PROVIDERS if p != "sdpa"]


@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
def test_mot_layer_cpu(benchmark, provider):
    benchmark.group = "mot-layer-fwd-bwd-cpu"
    _timed(benchmark, "layer-cpu", _cpu_workload, provider, rounds=5, attention_only=False)


@pytest.mark.parametrize("provider", CPU_ATTENTION_PROVIDERS)
def test_packed_attention_cpu(benchmark, provider):
    benchmark.group = "packed-attention-fwd-bwd-cpu"
    _timed(benchmark, "attn-cpu", _cpu_workload, provider, rounds=5, attention_only=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (7B layer width, bf16)")
@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
def test_mot_layer_7b_cuda(benchmark, provider):
    benchmark.group = "mot-layer-fwd-bwd-7b-bf16"
    _timed(benchmark, "layer-7b", _cuda_workload, provider, rounds=10, attention_only=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (7B attention width, bf16)")
@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
def test_packed_attention_7b_cuda(benchmark, provider):
    if provider == "sdpa" and not backends.has_flash_attn():
        pytest.skip("flash-attn is not installed: 'ours' already is the split-wise sdpa path")
    benchmark.group = "packed-attention-fwd-bwd-7b-bf16"
    _timed(benchmark, "attn-7b", _cuda_workload, provider, rounds=10, attention_only=True)
