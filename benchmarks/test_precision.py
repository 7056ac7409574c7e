"""CPU precision: fp32 vs bf16 weights vs int8 (ONNX Runtime, dynamic) vs ONNX Runtime fp32 (the
peer: the exported graph), for ``predict`` on preprocessed pixels and for ``aigid.scan`` end to end
on JPEGs, side by side in one run with this machine's own matmul limit per dtype (a 2048² matmul,
measured here), and the scan's decode limit (its decoding alone). MiraGe at ViT-B/32 with random
weights (8.8 GFLOP per 224² image), batch 16, the process's threads; UniGenDet at a scaled config.

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


def _best_rate(op, flop: float, reps: int = 10, trials: int = 5) -> float:
    """The fastest of ``trials`` timings of ``reps`` calls, in G(FL)OP/s: a limit is what the
    machine can reach, and single timings on a shared 2-core box scatter by 30%."""
    op()
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            op()
        best = min(best, time.perf_counter() - started)
    return flop * reps / best / 1e9


def _matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return _best_rate(lambda: a @ b, 2 * n ** 3)


def _int8_matmul_gops(n: int = 2048) -> float:
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    return _best_rate(lambda: torch._int_mm(a, b), 2 * n ** 3)  # int8 x int8 -> int32 (oneDNN / VNNI)


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
    bf16, int8, ort_fp32 = copy.deepcopy(fp32), copy.deepcopy(fp32), copy.deepcopy(fp32)
    set_precision(fp32, "fp32")
    set_precision(bf16, "bf16")
    set_precision(int8, "int8")  # ONNX Runtime, dynamic int8
    # the peer: ONNX Runtime on the fp32 graph (what `aigid export-model` writes), scoring through
    # predict's own path exactly as the int8 session does
    from aigid.models.int8 import int8_forward
    ort_fp32.int8_forward = int8_forward(ort_fp32, quantize=False)
    return {"fp32": fp32, "bf16": bf16, "int8": int8, "ort-fp32": ort_fp32}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "ort-fp32"])
def test_predict_pixels(benchmark, limits, models, precision):  # limits first: measured alone
    model = models[precision]
    pixels = torch.randn(BATCH, 3, 224, 224).clamp(-2, 2)
    model.predict(pixels)
    benchmark.group = "precision-predict-vitb32-b16"
    benchmark.pedantic(model.predict, args=(pixels,), rounds=ROUNDS, warmup_rounds=1)
    img_s = BATCH / statistics.median(benchmark.stats.stats.data)
    limit = limits["fp32" if precision == "ort-fp32" else precision]
    ceiling = limit / VIT_B32_GFLOP  # int8: its matmuls, though ORT keeps some ops fp32
    fp32 = models["fp32"].predict(pixels)
    info = {"img_per_s": round(img_s, 1), "matmul_gflops": round(limit),
            "pct_of_matmul_limit": round(100 * img_s / ceiling, 1),
            "max_abs_dp_vs_fp32": float((model.predict(pixels) - fp32).abs().max())}
    benchmark.extra_info.update(info)
    record_comparison(benchmark, case="precision-predict", name=precision, ours=precision in ("bf16", "int8"),
                      means="ViT-B/32 predict, ONNX Runtime on the fp32 graph" if precision == "ort-fp32"
                      else f"ViT-B/32 predict, {precision} weights")
    print(f"\npredict {precision}: {info}")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_photo_jpegs(tmp_path_factory.mktemp("jpegs"))


def test_scan_decode_limit(benchmark, models, jpegs):
    """The scan's decoding alone (JPEG 512x384 -> 224² pixels, as many decode processes as the scan
    starts here: on <= 4 cores none, the main thread decodes beside the scoring thread): the rate
    no precision can take the scan past."""
    from aigid.data.batches import iter_batches
    from aigid.scanning.local import default_workers

    preprocess = models["fp32"].config.preprocess  # the scan below decodes for this detector
    workers = default_workers(torch.device("cpu"))
    run = lambda: sum(len(b.records) for b in iter_batches([jpegs], preprocess, BATCH, device=torch.device("cpu"),  # noqa: E731
                                                           decoder="pil", num_workers=workers, evidence=False))
    benchmark.group = "precision-scan-vitb32-64jpeg"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    img_s = 64 / statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info.update(img_per_s=round(img_s, 1), decode_workers=workers)
    print(f"\nscan decode alone ({workers} workers): {img_s:.1f} img/s")


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


def test_unigendet_bf16(benchmark):
    """UniGenDet on a CPU, fp32 vs bf16 weights: a scaled config (MoT 512 wide x 8 layers, SigLIP
    384 x 6, 224² images; 65M parameters, random weights) -- the 7B release does not fit this
    machine in fp32. 8 images per predict."""
    import numpy as np

    from aigid.models.precision import set_precision
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig

    config = UniGenDetConfig.named("tiny")
    config.llm = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "head_dim": 64,
                  "intermediate_size": 1536, "vocab_size": 272, "rope_theta": 1e6, "rms_eps": 1e-6,
                  "qk_norm": True, "max_position": 32768}
    config.vit = {"hidden_size": 384, "intermediate_size": 1536, "num_layers": 6, "num_heads": 6,
                  "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6}
    config.preprocess = {**config.preprocess, "size": 224, "max_size": 224, "stride": 14}
    config.max_latent_size, config.vae_image_size = 16, 224
    config.vit_resize = {"max_size": 224, "min_size": 112, "stride": 14}
    torch.manual_seed(0)
    fp32 = UniGenDet(config, seed=0).eval()
    bf16 = copy.deepcopy(fp32)
    set_precision(fp32, "fp32")
    set_precision(bf16, "bf16")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(8)]
    rates = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        model.predict(images)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            model.predict(images)
            times.append(time.perf_counter() - started)
        rates[name] = len(images) / statistics.median(times)
    benchmark.group = "precision-unigendet"
    benchmark.pedantic(bf16.predict, args=(images,), rounds=1, iterations=1)
    info = {"fp32_img_per_s": round(rates["fp32"], 2), "bf16_img_per_s": round(rates["bf16"], 2),
            "ratio": round(rates["bf16"] / rates["fp32"], 2),
            "max_abs_dp": float((fp32.predict(images) - bf16.predict(images)).abs().max())}
    benchmark.extra_info.update(info)
    print(f"\nUniGenDet scaled config, 8 images 224²: {info}")


def _agreement_of(fp32, bf16, paths, labels):
    from aigid.evaluation.agreement import agreement

    return agreement(fp32.predict(paths), bf16.predict(paths), labels, threshold=fp32.threshold)


def test_agreement_on_the_demo_aligned_set(benchmark, demo_run, models):
    """Not a speed: what `aigid agreement` records (and auto decides on), for the trained tiny demo
    detector and for the random ViT-B/32 on the same held-out images."""
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
