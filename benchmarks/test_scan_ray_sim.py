"""Scaling simulation of ``scan_ray`` on CPU: do N scoring actors stay busy, and does images/s
grow linearly with N?

The scoring actors are replaced by a stand-in that holds each batch for a fixed latency (what a
GPU's model call costs) and asks for zero CPUs, so N = 1, 2, 4, 8 of them fit on a laptop; the
rest is the real pipeline (walk, archive expansion, decode tasks on the CPUs, the driver writing
SQLite). ``extra_info`` per N: ``images_per_s`` over the scoring window (first batch start to
last batch end), ``busy`` (the actors' busy time over N x that window; goal >= 0.9),
``linearity`` (images/s over N x the N = 1 rate; goal ~1.0), ``per_actor`` items. Each stand-in logs its batches' (start, end) times, so busy time and
the window are measured where the work happens.

The latency is set so the stand-ins, not the decode CPUs, are the bottleneck up to N = 8 on two
cores (``BATCH / LATENCY_S * 8`` images/s must stay below what the decode tasks deliver).

    pytest benchmarks/test_scan_ray_sim.py --benchmark-only -s
"""
from __future__ import annotations

import io
import os
import platform
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="scan_ray needs the [dist] extra (ray[data])")

BATCH, LATENCY_S, BATCHES_PER_ACTOR = 16, 2.0, 5  # 8 actors: 64 images/s, under the decode rate
SHARDS = 8


class LatencyScorer:
    """Stand-in scoring actor: sleeps ``LATENCY_S`` per batch (GIL released, like a GPU call) and
    appends each batch's (start, end) wall-clock times to ``spans/<actor>.txt``."""
    spans = ""  # set by the test before the class is shipped to the actors
    latency = LATENCY_S

    def __init__(self, detector, layout, preprocess):
        self.actor = ray.get_runtime_context().get_actor_id()

    def __call__(self, batch):
        import pyarrow as pa

        from aigid.scanning.ray_stages import SCORED

        started = time.time()
        time.sleep(self.latency)
        ended = time.time()
        with open(os.path.join(self.spans, f"{self.actor}.txt"), "a") as f:
            f.write(f"{started} {ended}\n")
        n = batch.num_rows
        busy = (ended - started) / max(1, n)
        return pa.table({"id": batch["id"], "hash": batch["hash"], "size": batch["size"],
                         "score": pa.array([0.5] * n, pa.float64()), "error": batch["error"],
                         "evidence": batch["evidence"],
                         "actor": [self.actor] * n, "busy_s": [busy] * n}, schema=SCORED)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _corpus(root, n: int) -> None:
    """``n`` PNGs: half in ``SHARDS`` tars, half loose."""
    (root / "loose").mkdir(parents=True)
    half = n // 2
    for i in range(n - half):
        (root / "loose" / f"{i:05d}.png").write_bytes(_png(i))
    for s in range(SHARDS):
        with tarfile.open(root / f"shard-{s:02d}.tar", "w") as tf:
            for j in range(s, half, SHARDS):
                data = _png(100000 + j)
                info = tarfile.TarInfo(f"{j:05d}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import torch

    from aigid.models.mirage import MiraGe, MiraGeConfig

    ray.init(num_cpus=int(os.environ.get("AIGID_SIM_CPUS", 2)), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    torch.manual_seed(0)
    det = tmp_path_factory.mktemp("det")
    MiraGe(MiraGeConfig.named("tiny"), seed=0).save_pretrained(det)
    # Warm-up: Ray keeps its worker processes, so the measured runs do not pay for starting
    # them (and importing torch) while the first batches are due.
    warm = tmp_path_factory.mktemp("warm")
    _corpus(warm / "data", 4 * BATCH)
    (warm / "spans").mkdir()
    LatencyScorer.spans, latency = str(warm / "spans"), LatencyScorer.latency
    LatencyScorer.latency = 0.0
    from aigid.scanning.ray import scan_ray
    scan_ray([warm / "data"], str(det), out=warm / "r.sqlite", batch_size=BATCH, min_actors=2,
             max_actors=2, gpus_per_actor=0, cpus_per_actor=0, progress=False, _scorer=LatencyScorer)
    LatencyScorer.latency = latency
    yield det
    ray.shutdown()


RATES: dict[int, float] = {}


@pytest.mark.parametrize("actors", [1, 2, 4, 8])
def test_scan_ray_actor_scaling(benchmark, cluster, tmp_path, actors):
    from aigid.scanning.ray import scan_ray

    n = actors * BATCHES_PER_ACTOR * BATCH
    _corpus(tmp_path / "data", n)
    spans = tmp_path / "spans"
    spans.mkdir()
    LatencyScorer.spans = str(spans)

    def run():
        return scan_ray([tmp_path / "data"], str(cluster), out=tmp_path / "r.sqlite",
                        batch_size=BATCH, items_per_task=2 * BATCH, min_actors=actors,
                        max_actors=actors, gpus_per_actor=0, cpus_per_actor=0, progress=False,
                        _scorer=LatencyScorer)

    summary = benchmark.pedantic(run, rounds=1, iterations=1)
    assert summary["scored"] == n
    pairs = [tuple(map(float, line.split())) for f in spans.iterdir()
             for line in f.read_text().split("\n") if line]
    window = max(e for _, e in pairs) - min(s for s, _ in pairs)  # first start .. last end
    busy = sum(e - s for s, e in pairs)
    rate = n / window
    RATES[actors] = rate
    one = RATES.get(1)
    benchmark.extra_info.update({
        "actors": actors, "images": n, "batch": BATCH, "latency_s": LATENCY_S,
        "images_per_s": round(rate, 1), "ideal_images_per_s": round(actors * BATCH / LATENCY_S, 1),
        "busy": round(busy / (actors * window), 3),
        "linearity": round(rate / (actors * one), 3) if one else None,
        "per_actor": sorted(int(a["items"]) for a in summary["actors"].values()),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, load "
                  f"{os.getloadavg()[0]:.1f})"})
