"""Decode throughput of the bulk-scanning data path (images/s), ours vs peers in one run.

CPU (always): 64 generated 512x384 JPEGs preprocessed to 224x224 by
  - ``naive``: the plain loop ``predict`` would run (``load_rgb`` + ``eval_transform`` per file),
  - ``pil-w0`` / ``pil-w2``: ``iter_batches(decoder="pil")`` in-process and with 2 workers
    (the worker start-up is inside the timing: it is paid once per scan),
  - ``dali-cpu``: ``iter_batches(decoder="dali", device="cpu")``: DALI's CPU pipeline with 2
    threads (built inside the timing, like the workers); ``extra_info`` holds its speed-up over
    ``pil-w0`` and ``pil-w2`` (whether DALI should be the CPU default), skipped without DALI.
CUDA: 2048 such JPEGs to 224x224 on the GPU by
  - ``pil-w16``: ``iter_batches(decoder="pil", num_workers=16)`` (pinned, non-blocking copies),
  - ``nvjpeg-torchvision``: ``torchvision.io.decode_jpeg(device="cuda")`` in batches + torch resize,
  - ``dali``: ``iter_batches(decoder="dali")`` (16 workers read, DALI decodes), goal >= 4x pil-w16;
    the ratio is recorded in ``extra_info["speedup_vs_pil_w16"]``.

    pytest benchmarks/test_decode.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

from aigid import backends
from aigid.data.batches import iter_batches
from aigid.data.images import load_rgb
from aigid.data.transforms import eval_transform

from _images import photo_like_jpeg
from _report import record_comparison

HAS_CUDA = torch.cuda.is_available()
PP = {"size": 224, "resize_mode": "shortest", "interpolation": "bicubic",
      "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
W, H = 512, 384
_RESULTS: dict[str, float] = {}  # images/s per impl, for ratios within this run

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU size: needs a CUDA device")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU size: CUDA runs time the GPU sizes")


def _make_set(folder, n: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(photo_like_jpeg(i, W, H))
    return str(folder)


@pytest.fixture(scope="module")
def cpu_set(tmp_path_factory):
    return _make_set(tmp_path_factory.mktemp("decode-cpu"), 64)


@pytest.fixture(scope="module")
def gpu_set(tmp_path_factory):
    return _make_set(tmp_path_factory.mktemp("decode-gpu"), 2048)


def _device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else f"cpu ({os.cpu_count()} cores)"


def _run_scan(folder: str, *, device: str, decoder: str, workers: int, batch: int = 64,
              dali_threads: int = 4) -> int:
    n = 0
    for b in iter_batches([folder], PP, batch, device=device, decoder=decoder, num_workers=workers,
                          dali_threads=dali_threads):
        assert not b.errors
        n += b.pixels.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return n


def _naive(folder: str) -> int:
    transform = eval_transform(PP)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    return torch.stack([transform(load_rgb(f)) for f in files]).shape[0]


def _nvjpeg_torchvision(folder: str, batch: int = 64) -> int:
    """The strongest GPU peer without DALI: torchvision's nvJPEG decode + torch resize/crop."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg, read_file

    mean = torch.tensor(PP["mean"], device="cuda")[:, None, None] * 255
    std = torch.tensor(PP["std"], device="cuda")[:, None, None] * 255
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    n, s = 0, PP["size"]
    for start in range(0, len(files), batch):
        encoded = [read_file(f) for f in files[start:start + batch]]
        out = []
        for img in decode_jpeg(encoded, device="cuda"):
            h, w = img.shape[-2:]
            scale = s / min(h, w)
            size = (max(s, int(h * scale)), max(s, int(w * scale)))
            img = F.interpolate(img[None].float(), size=size, mode="bicubic", antialias=True)[0]
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            out.append((img[:, top:top + s, left:left + s].clamp(0, 255) - mean) / std)
        n += torch.stack(out).shape[0]
    torch.cuda.synchronize()
    return n


DECODE_MEANS = {
    "naive": "load_rgb + eval_transform per file, one process",
    "pil-w0": "iter_batches(decoder='pil'), in-process",
    "pil-w2": "iter_batches(decoder='pil'), 2 worker processes",
    "dali-cpu": "iter_batches(decoder='dali') on CPU, DALI with 2 threads",
    "pil-w16": "iter_batches(decoder='pil'), 16 workers",
    "nvjpeg-torchvision": "torchvision decode_jpeg on CUDA + torch resize",
    "dali": "iter_batches(decoder='dali'), 16 readers, DALI decodes",
}


def _record(benchmark, impl: str, n: int, **extra) -> None:
    cuda = impl in ("pil-w16", "nvjpeg-torchvision", "dali")
    ours = impl == "dali" if cuda else impl != "naive"  # on CUDA pil-w16 is the goal's baseline
    record_comparison(benchmark, case="decode-cuda" if cuda else "decode-cpu", name=impl,
                      ours=ours, means=DECODE_MEANS[impl])
    ips = n / benchmark.stats.stats.mean
    _RESULTS[impl] = ips
    benchmark.extra_info.update({"impl": impl, "device": _device_name(), "images": n,
                                 "images_per_s": round(ips, 1), "size": PP["size"],
                                 "source": f"{W}x{H} JPEG q90", **extra})


@cpu_only
@pytest.mark.parametrize("impl", ["naive", "pil-w0", "pil-w2", "dali-cpu"])
def test_decode_cpu(benchmark, cpu_set, impl):
    benchmark.group = f"decode 64 JPEG {W}x{H} -> {PP['size']}^2, cpu"
    if impl == "dali-cpu" and not backends.has_dali():
        pytest.skip("nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    if impl == "naive":
        fn = lambda: _naive(cpu_set)  # noqa: E731
    elif impl == "dali-cpu":
        fn = lambda: _run_scan(cpu_set, device="cpu", decoder="dali", workers=0,  # noqa: E731
                               dali_threads=2)
    else:
        workers = int(impl.removeprefix("pil-w"))
        fn = lambda: _run_scan(cpu_set, device="cpu", decoder="pil", workers=workers)  # noqa: E731
    n = benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    assert n == 64
    workers = int(impl[-1]) if impl.startswith("pil") else 0
    _record(benchmark, impl, n, num_workers=workers,
            **({"dali_threads": 2} if impl == "dali-cpu" else {}))
    if impl != "naive" and "naive" in _RESULTS:
        benchmark.extra_info["speedup_vs_naive"] = round(_RESULTS[impl] / _RESULTS["naive"], 2)
    for base in ("pil-w0", "pil-w2") if impl == "dali-cpu" else ():
        if base in _RESULTS:
            key = f"speedup_vs_{base.replace('-', '_')}"
            benchmark.extra_info[key] = round(_RESULTS[impl] / _RESULTS[base], 2)


@needs_cuda
@pytest.mark.parametrize("impl", ["pil-w16", "nvjpeg-torchvision", "dali"])
def test_decode_gpu(benchmark, gpu_set, impl):
    benchmark.group = f"decode 2048 JPEG {W}x{H} -> {PP['size']}^2, cuda"
    if impl == "dali" and not backends.has_dali():
        pytest.skip("nvidia-dali is not installed (pip install aigid[gpu])")
    if impl == "pil-w16":
        fn = lambda: _run_scan(gpu_set, device="cuda", decoder="pil", workers=16)  # noqa: E731
    elif impl == "dali":
        fn = lambda: _run_scan(gpu_set, device="cuda", decoder="dali", workers=16)  # noqa: E731
    else:
        fn = lambda: _nvjpeg_torchvision(gpu_set)  # noqa: E731
    n = benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    assert n == 2048
    _record(benchmark, impl, n, num_workers=16 if impl != "nvjpeg-torchvision" else 0)
    if impl != "pil-w16" and "pil-w16" in _RESULTS:
        benchmark.extra_info["speedup_vs_pil_w16"] = round(_RESULTS[impl] / _RESULTS["pil-w16"], 2)
