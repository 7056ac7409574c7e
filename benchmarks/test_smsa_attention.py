"""SMSA attention: the fused multi-source kernel against the strongest peers, in one run.

Workload (CUDA): q (B, 16, L_q, 128) with GQA 4 (H_kv = 4) over three K/V sources of L_q keys
each, bf16, L_q ∈ {256, 1024, 4096}; forward and forward + backward. Providers:

* ``triton``: ``aigid.ops.smsa_attention(backend="triton")``, reading the sources in place
  (on sm_90+ its autotuner picks between pointer and TMA-descriptor tiles);
* ``triton_pointers``: the same with ``AIGID_SMSA_TMA=0`` (pointer tiles only): the A/B that
  says whether TMA pays off on this GPU;
* ``sdpa_cat``: ``torch.cat`` of the sources + ``scaled_dot_product_attention(enable_gqa=True)``;
* ``reference``: BAGEL's training path (cat + ``repeat_interleave`` to all heads + SDPA);
* ``flash_attn``: ``flash_attn_func`` on the concatenation (native GQA), when installed;
* ``xformers``: ``memory_efficient_attention`` on the concatenation (5-D GQA layout), when installed.

Every peer pays for its concatenation inside the timed region, as it would in the model; each
gets its inputs in its native layout ((B, H, L, d) for torch, (B, L, H, d) for the libraries).
``extra_info`` holds the device, sizes, FLOPs (forward 4·B·H_q·L_q·ΣL_s·d; forward + backward
3.5× that, the flash-attention convention), bytes, TFLOP/s (median), the fraction of the device's
bf16 peak (``_report.throughput_info``) and the speed ratio against ``sdpa_cat`` in the same
group. On CPU only a few small fp32 cases of the torch paths run (the Triton interpreter is not a
benchmark), so ``pytest benchmarks --benchmark-only`` stays short.
"""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from aigid import backends, ops
from aigid.kernels.reference import smsa_attention_reference

from _report import record_comparison, throughput_info

CUDA = torch.cuda.is_available()
HEADS, KV_HEADS, HEAD_DIM, N_SOURCES = 16, 4, 128, 3
CUDA_BATCH = 2
CPU_CASE = dict(batch=1, heads=4, kv_heads=1, l_q=128, head_dim=64)

_means: dict[tuple[str, str], float] = {}  # (group, provider) -> mean seconds, for the ratios


# ---------------------------------------------------------------------------------------------
# Providers: each returns a closure computing the attention output from prepared inputs.
# ---------------------------------------------------------------------------------------------

def _torch_inputs(batch, heads, kv_heads, l_q, head_dim, dtype, device):
    q = torch.randn(batch, heads, l_q, head_dim, dtype=dtype, device=device)
    sources = [(torch.randn(batch, kv_heads, l_q, head_dim, dtype=dtype, device=device),
                torch.randn(batch, kv_heads, l_q, head_dim, dtype=dtype, device=device))
               for _ in range(N_SOURCES)]
    return q, sources


def _make_triton(q, sources):
    return [q, *[t for p in sources for t in p]], lambda: ops.smsa_attention(q, sources, backend="triton")


def _make_sdpa_cat(q, sources):
    def run():
        k = torch.cat([k_s for k_s, _ in sources], dim=2)
        v = torch.cat([v_s for _, v_s in sources], dim=2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return [q, *[t for p in sources for t in p]], run


def _make_reference(q, sources):
    return [q, *[t for p in sources for t in p]], lambda: smsa_attention_reference(q, sources)


def _make_flash_attn(q, sources):
    from flash_attn import flash_attn_func

    q_l = q.transpose(1, 2).contiguous().detach().requires_grad_(q.requires_grad)
    src_l = [(k.transpose(1, 2).contiguous().detach().requires_grad_(k.requires_grad),
              v.transpose(1, 2).contiguous().detach().requires_grad_(v.requires_grad))
             for k, v in sources]

    def run():
        k = torch.cat([k_s for k_s, _ in src_l], dim=1)
        v = torch.cat([v_s for _, v_s in src_l], dim=1)
        return flash_attn_func(q_l, k, v, causal=False)
    return [q_l, *[t for p in src_l for t in p]], run


def _make_xformers(q, sources):
    from xformers.ops import memory_efficient_attention

    b, h_q, l_q, d = q.shape
    h_kv = sources[0][0].shape[1]
    group = h_q // h_kv
    # 5-D GQA layout (B, L, G, H/G, d); K/V broadcast over the heads of a group.
    q_l = (q.transpose(1, 2).reshape(b, l_q, h_kv, group, d).contiguous().detach()
           .requires_grad_(q.requires_grad))
    src_l = [(k.transpose(1, 2).contiguous().detach().requires_grad_(k.requires_grad),
              v.transpose(1, 2).contiguous().detach().requires_grad_(v.requires_grad))
             for k, v in sources]

    def run():
        k = torch.cat([k_s for k_s, _ in src_l], dim=1)
        v = torch.cat([v_s for _, v_s in src_l], dim=1)
        n = k.shape[1]
        k = k[:, :, :, None].expand(b, n, h_kv, group, d)
        v = v[:, :, :, None].expand(b, n, h_kv, group, d)
        return memory_efficient_attention(q_l, k, v)
    return [q_l, *[t for p in src_l for t in p]], run


_PROVIDERS = {
    "sdpa_cat": _make_sdpa_cat,  # first in each group: the ratios' baseline
    "reference": _make_reference,
    "triton": _make_triton,
    "triton_pointers": _make_triton,  # run with AIGID_SMSA_TMA=0 (see the test)
    "flash_attn": _make_flash_attn,
    "xformers": _make_xformers,
}


SMSA_MEANS = {
    "triton": "aigid's fused multi-source kernel",
    "triton_pointers": "the same kernel without TMA descriptors (AIGID_SMSA_TMA=0)",
    "sdpa_cat": "torch.cat of the sources + SDPA (native GQA)",
    "reference": "BAGEL's path, cat + repeat K/V + SDPA (aigid's CPU path)",
    "flash_attn": "flash_attn_func on the concatenation",
    "xformers": "xformers memory_efficient_attention on the concatenation",
}


def _skip_reason(provider: str, device: str) -> str | None:
    if device == "cuda" and not CUDA:
        return "CUDA-only case (bf16 GPU workload): no CUDA device on this machine"
    if provider.startswith("triton") and not backends.has_triton():
        return "Triton is not installed"
    if provider == "flash_attn" and not backends.has_flash_attn():
        return "flash-attn is not installed"
    if provider == "xformers" and not backends.has_xformers():
        return "xformers is not installed"
    return None


def _cases():
    cases = []
    for mode in ("fwd", "fwd_bwd"):
        for provider in ("sdpa_cat", "reference"):
            cases.append(pytest.param("cpu", mode, CPU_CASE["l_q"], provider,
                                      id=f"cpu-{mode}-Lq{CPU_CASE['l_q']}-{provider}"))
        for l_q in (256, 1024, 4096):
            for provider in _PROVIDERS:
                reason = _skip_reason(provider, "cuda")
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                cases.append(pytest.param("cuda", mode, l_q, provider, marks=marks,
                                          id=f"cuda-{mode}-Lq{l_q}-{provider}"))
    return cases


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.mark.parametrize("device, mode, l_q, provider", _cases())
def test_smsa_attention(benchmark, monkeypatch, device, mode, l_q, provider):
    if provider == "triton_pointers":  # read per launch: forward and backward alike
        monkeypatch.setenv("AIGID_SMSA_TMA", "0")
    if device == "cuda":
        batch, heads, kv_heads, head_dim, dtype = CUDA_BATCH, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16
    else:
        batch, heads, kv_heads, head_dim = (CPU_CASE[k] for k in ("batch", "heads", "kv_heads", "head_dim"))
        dtype = torch.float32
    torch.manual_seed(0)
    q, sources = _torch_inputs(batch, heads, kv_heads, l_q, head_dim, dtype, device)
    backward = mode == "fwd_bwd"
    if backward:
        for t in [q, *[x for p in sources for x in p]]:
            t.requires_grad_(True)
    leaves, forward = _PROVIDERS[provider](q, sources)
    grad_out = None

    def step():
        nonlocal grad_out
        out = forward()
        if backward:
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.grad(out, leaves, grad_out)
        if device == "cuda":
            torch.cuda.synchronize()

    group = f"smsa-{device}-{mode}-Lq{l_q}"
    benchmark.group = group
    kv_len = N_SOURCES * l_q
    flops = 4 * batch * heads * l_q * kv_len * head_dim * (3.5 if backward else 1.0)
    benchmark.extra_info.update(
        device=_device_name(device), dtype=str(dtype).removeprefix("torch."), provider=provider,
        mode=mode, batch=batch, heads_q=heads, heads_kv=kv_heads, head_dim=head_dim, l_q=l_q,
        source_lengths=[l_q] * N_SOURCES, flops=flops)
    ours = "triton" if device == "cuda" else "reference"  # what aigid.ops runs on this device
    record_comparison(benchmark, case=group, name=provider, ours=provider == ours,
                      means=SMSA_MEANS[provider])
    if device == "cuda":
        benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    else:
        benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)

    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        mean = stats.stats.mean
        _means[(group, provider)] = mean
        size = torch.empty((), dtype=dtype).element_size()
        q_elems, kv_elems = batch * heads * l_q * head_dim, 2 * batch * kv_heads * kv_len * head_dim
        # minimal traffic: q, K/V, out once; backward also reads q, o, dO, K/V, writes dq, dK/dV
        elems = 2 * q_elems + kv_elems + ((4 * q_elems + 2 * kv_elems) if backward else 0)
        benchmark.extra_info.update(throughput_info(
            flops=flops, bytes_moved=elems * size, seconds=stats.stats.median,
            device_name=benchmark.extra_info["device"]))
        base = _means.get((group, "sdpa_cat"))
        if base is not None:
            benchmark.extra_info["speedup_vs_sdpa_cat"] = base / mean
