"""CPU precision: fp32 vs bf16 weights vs int8 (ONNX Runtime, dynamic), for
``predict`` on preprocessed pixels and for ``aigid.scan`` end to end on JPEGs, side by side in one
run with this machine's own matmul limit per dtype (a 2048² matmul, measured here). MiraGe at
ViT-B/32 with random weights (8.8 GFLOP per 224² image), batch 16, the process's threads.

    pytest benchmarks/test_precision.py --benchmark-only -s
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

from _images import write_photo_jpegs
from _report import record_comparison

VIT_B32_GFLOP = 8.8
BATCH = 16
ROUNDS = 5


def _matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - started) / 1e9


def _int8_matmul_gops(n: int = 2048, reps: int = 10) -> float:
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    torch._int_mm(a, b)  # int8 x int8 -> int32 (oneDNN / VNNI)
    started = time.perf_counter()
    for _ in range(reps):
        torch._int_mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - started) / 1e9


@pytest.fixture(scope="module")
def limits():
    return {"fp32": _matmul_gflops(torch.float32), "bf16": _matmul_gflops(torch.bfloat16),
            "int8": _int8_matmul_gops()}


@pytest.fixture(scope="module")
def models():
    """One random ViT-B/32 MiraGe and its bf16 twin: the *same* weights (open_clip's random init
    is not seeded by MiraGe's seed, so two builds would differ)."""
    from aigid.models.mirage import MiraGe, MiraGeConfig
    from aigid.models.precision import set_precision

    config = MiraGeConfig.named("vit-l-14")
    config.backbone = {"model": "ViT-B-32", "pretrained": None}  # random weights: speed only
    torch.manual_seed(0)  # open_clip's random init draws from the global generator
    fp32 = MiraGe(config, seed=0).eval()
    bf16, int8 = copy.deepcopy(fp32), copy.deepcopy(fp32)
    set_precision(fp32, "fp32")
    set_precision(bf16, "bf16")
    set_precision(int8, "int8")  # ONNX Runtime, dynamic int8
    return {"fp32": fp32, "bf16": bf16, "int8": int8}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_predict_pixels(benchmark, limits, models, precision):  # limits first: measured alone
    model = models[precision]
    pixels = torch.randn(BATCH, 3, 224, 224).clamp(-2, 2)
    model.predict(pixels)
    benchmark.group = "precision-predict-vitb32-b16"
    benchmark.pedantic(model.predict, args=(pixels,), rounds=ROUNDS, warmup_rounds=1)
    img_s = BATCH / statistics.median(benchmark.stats.stats.data)
    ceiling = limits[precision] / VIT_B32_GFLOP  # int8: its matmuls, though ORT keeps some ops fp32
    fp32 = models["fp32"].predict(pixels)
    info = {"img_per_s": round(img_s, 1), "matmul_gflops": round(limits[precision]),
            "pct_of_matmul_limit": round(100 * img_s / ceiling, 1),
            "max_abs_dp_vs_fp32": float((model.predict(pixels) - fp32).abs().max())}
    benchmark.extra_info.update(info)
    record_comparison(benchmark, case="precision-predict", name=precision, ours=precision != "fp32",
                      means=f"ViT-B/32 predict, {precision} weights")
    print(f"\npredict {precision}: {info}")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_photo_jpegs(tmp_path_factory.mktemp("jpegs"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_scan_jpegs(benchmark, models, jpegs, precision):
    from aigid.scanning.local import scan

    model = models[precision]
    run = lambda: sum(1 for _ in scan([jpegs], model, batch_size=BATCH, progress=False, evidence=False))  # noqa: E731
    benchmark.group = "precision-scan-vitb32-64jpeg"
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    img_s = 64 / statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info.update(img_per_s=round(img_s, 1))
    record_comparison(benchmark, case="precision-scan", name=precision, ours=precision != "fp32",
                      means=f"aigid.scan of 64 512x384 JPEGs, {precision} weights")
    print(f"\nscan {precision}: {img_s:.1f} img/s")


def _val_set(root):
    from aigid.data.labelled import discover

    items = discover(str(root / "val"))
    return [it.path for it in items], [it.label for it in items]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's aligned set and its trained tiny detector (real crops vs VAE twins)."""
    from aigid.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(str(out), steps=200, progress=False)
    return out


def _agreement_of(fp32, bf16, paths, labels):
    from aigid.evaluation.agreement import agreement

    return agreement(fp32.predict(paths), bf16.predict(paths), labels, threshold=fp32.threshold)


def test_agreement_on_the_demo_aligned_set(benchmark, demo_run, models):
    """Not a speed: the numbers CPU_BF16_AUTO waits on, for the trained tiny demo detector and for
    the random ViT-B/32 on the same held-out images."""
    from aigid.models.registry import load_detector

    paths, labels = _val_set(demo_run / "data")
    detector = str(demo_run / "detector")
    tiny = benchmark.pedantic(lambda: _agreement_of(load_detector(detector), load_detector(detector, precision="bf16"),
                                                    paths, labels), rounds=1, iterations=1)
    vit = _agreement_of(models["fp32"], models["bf16"], paths, labels)
    vit_int8 = _agreement_of(models["fp32"], models["int8"], paths, labels)
    benchmark.group = "precision-agreement"
    benchmark.extra_info.update(tiny_demo=tiny, vit_b32_random=vit, vit_b32_random_int8=vit_int8)
    print(f"\nagreement vs fp32, demo val set ({len(paths)} images):\n  bf16 tiny trained: {tiny}\n"
          f"  bf16 ViT-B/32 random: {vit}\n  int8 ViT-B/32 random: {vit_int8}")
