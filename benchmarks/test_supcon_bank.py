"""MiraGe's memory-bank SupCon loss, forward + backward: fused Triton kernel vs the eager
reference vs ``torch.compile(reference)``, in one run.

Each (N, M, D, dtype) is one pytest-benchmark group, so the table's parenthesised numbers are
the ratios to the fastest implementation of that size. ``extra_info`` records the device,
dtype, sizes, useful FLOPs, bytes, TFLOP/s and the fraction of the device's bf16 peak
(``_report.throughput_info``) and, on CUDA, the peak memory of one forward + backward
(``torch.cuda.max_memory_allocated``: absolute, and above the inputs already resident).

On CUDA: bf16, D = 768, N ∈ {256, 1024, 4096}, M ∈ {64, 4096, 65536}, A = 2 text anchors.
Without CUDA only a CPU smoke run: the eager reference at two small fp32 sizes and the compiled
reference at the smallest (the kernel would only run under Triton's interpreter, which is a
correctness tool, not something to time).

    pytest benchmarks/test_supcon_bank.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigid.kernels.reference import supcon_bank_loss_reference

from _report import record_comparison, throughput_info

HAS_CUDA = torch.cuda.is_available()
TEMPERATURE = 0.07
N_ANCHORS = 2
GPU_D, GPU_DTYPE = 768, torch.bfloat16
CPU_D, CPU_DTYPE = 128, torch.float32

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU size: needs a CUDA device")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU smoke size: CUDA runs time the GPU sizes")
kernel_needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="the Triton kernel is timed on CUDA only (not under the interpreter)")
compile_cpu_once = pytest.mark.skipif(
    not HAS_CUDA, reason="inductor compiles for ~40 s on CPU: the smoke run compiles one size only")


SUPCON_MEANS = {
    "triton": "aigid's fused Triton kernel",
    "eager": "the plain-PyTorch reference (aigid's CPU path)",
    "compiled": "torch.compile(reference)",
}


def _params():
    params = []
    # (32, 64): MiraGe's defaults (batch 32, bank 64), the kernel's one-launch small path
    for n, m in [(32, 64)] + [(n, m) for n in (256, 1024, 4096) for m in (64, 4096, 65536)]:
        for impl in ("triton", "eager", "compiled"):
            params.append(pytest.param(impl, n, m, GPU_D, GPU_DTYPE, marks=needs_cuda,
                                       id=f"{impl}-N{n}-M{m}-D{GPU_D}-bf16"))
    for i, (n, m) in enumerate(((64, 256), (256, 2048))):
        for impl in ("triton", "eager", "compiled"):
            marks = [cpu_only]
            if impl == "triton":
                marks.append(kernel_needs_cuda)
            if impl == "compiled" and i > 0:
                marks.append(compile_cpu_once)
            params.append(pytest.param(impl, n, m, CPU_D, CPU_DTYPE, marks=marks,
                                       id=f"{impl}-N{n}-M{m}-D{CPU_D}-fp32-cpu"))
    return params


def _inputs(n, m, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype)
    anchors = F.normalize(torch.randn(N_ANCHORS, d, generator=g), dim=1).to(device, dtype)
    feats.requires_grad_(True)
    anchors.requires_grad_(True)
    bank = F.normalize(torch.randn(m, d, generator=g), dim=1).to(device, dtype)
    labels = torch.randint(0, 2, (n,), generator=g).to(device)
    anchor_labels = torch.arange(N_ANCHORS).to(device)
    bank_labels = torch.randint(0, 2, (m,), generator=g).to(device)
    return feats, labels, bank, bank_labels, anchors, anchor_labels


def _loss_fn(impl):
    if impl == "eager":
        return supcon_bank_loss_reference
    if impl == "compiled":
        torch._dynamo.reset()  # a fresh, static-shape compile per size: no recompile-limit fallback
        return torch.compile(supcon_bank_loss_reference, dynamic=False)
    from aigid.kernels.supcon_bank import supcon_bank_loss_triton
    return supcon_bank_loss_triton


@pytest.mark.parametrize("impl,n,m,d,dtype", _params())
def test_supcon_bank_fwd_bwd(benchmark, impl, n, m, d, dtype):
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    feats, labels, bank, bank_labels, anchors, anchor_labels = _inputs(n, m, d, dtype, device)
    loss_fn = _loss_fn(impl)
    sync = torch.cuda.synchronize if HAS_CUDA else (lambda: None)

    def step():
        feats.grad = None
        anchors.grad = None
        loss = loss_fn(feats, labels, bank, bank_labels, anchors, anchor_labels, TEMPERATURE)
        loss.backward()
        sync()
        return loss

    loss = step()  # compile / autotune / allocator warm-up, outside the timing
    assert torch.isfinite(loss).item()

    peak, peak_extra = None, None
    if HAS_CUDA:
        feats.grad = anchors.grad = None
        sync()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated()
        peak_extra = peak - resident

    benchmark.group = f"supcon fwd+bwd N={n} M={m} D={d} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update({
        "impl": impl,
        "device": torch.cuda.get_device_name(device) if HAS_CUDA else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "N": n, "M": m, "D": d, "A": N_ANCHORS,
        "peak_mem_mib": None if peak is None else round(peak / 2**20, 1),
        "peak_extra_mib": None if peak_extra is None else round(peak_extra / 2**20, 1),
        "torch": torch.__version__,
    })
    ours = "triton" if HAS_CUDA else "eager"  # what aigid.ops.supcon_bank_loss runs here
    record_comparison(benchmark, case=f"supcon-N{n}-M{m}", name=impl, ours=impl == ours,
                      means=SUPCON_MEANS[impl])
    large = n * (n + m) * d > 1e11
    benchmark.pedantic(step, rounds=5 if large else 15, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    flops, nbytes = _work(n, m, d, dtype)
    benchmark.extra_info.update(throughput_info(
        flops=flops, bytes_moved=nbytes, seconds=stats.stats.median if stats else None,
        device_name=benchmark.extra_info["device"]))


def _work(n: int, m: int, d: int, dtype: torch.dtype) -> tuple[float, float]:
    """Useful FLOPs and minimal bytes of one forward + backward, the same for every impl.

    FLOPs: forward logits 2·N·K·D (K = N + A + M keys); backward the logits once more
    (flash-attention's convention), dq's 2·N·K·D and dk's 2·N·(N + A)·D (gᵀ·q over the batch
    and anchor columns).
    Bytes: every key (and the queries, which are among them) read once per pass, the
    feats/anchors gradients written once.
    """
    keys = n + N_ANCHORS + m
    flops = 3 * 2 * n * keys * d + 2 * n * (n + N_ANCHORS) * d
    size = torch.empty((), dtype=dtype).element_size()
    return float(flops), float((2 * keys * d + (n + N_ANCHORS) * d) * size)
