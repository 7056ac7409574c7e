"""Tokens/s of one UniGenDet GDUF training step: 1 process vs 2 FSDP2 ranks, same global batch.

Providers (same weights, same global batch of 8 detection + 8 generation samples per step):

* ``fsdp2x2`` (ours): ``torchrun --nproc_per_node 2``, :func:`aigid.training.unigendet.shard.build_sharded`
  (per-layer ``fully_shard``, gloo on CPU / nccl on CUDA), each rank half the batch.
* ``single``: torchrun with one rank (the same FSDP2 path over one process), the whole batch.

Each launch trains 2 warm-up steps and ``TIMED`` timed steps; ``extra_info`` holds the median
step time measured inside the worker, the packed tokens per step (summed over ranks) and
tokens/s, plus the device. The pytest-benchmark time is the whole launch (start-up included).
On CPU the model is ``unigendet-tiny`` with one thread per rank (communication-dominated: this
measures the overhead of sharding, not a speed-up); on CUDA the same run needs 2 GPUs.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TIMED = 5
WARMUP = 2
PER_STEP = 8  # detection and generation samples per global step


def _global_items(step: int):
    from aigid.training.unigendet.common import DetectionItem, GenerationItem
    g = torch.Generator().manual_seed(step)
    pix = torch.rand(PER_STEP, 3, 32, 32, generator=g) * 2 - 1
    lat = torch.randn(PER_STEP, 4, 4, 4, generator=g)
    return ([DetectionItem(pix[i], i % 2, "an explanation", lat[i]) for i in range(PER_STEP)],
            [GenerationItem(f"prompt {i}", None, lat[i]) for i in range(PER_STEP)])


def _worker(source: str, out: str) -> None:
    from aigid.training import dist
    from aigid.training.unigendet.common import GDUFConfig, RunOptions
    from aigid.training.unigendet.gduf import train_gduf
    from aigid.training.unigendet.shard import build_sharded

    torch.set_num_threads(1)
    ctx = dist.init()
    model = build_sharded(source, ctx)
    tokens = []
    model.language_model.model.register_forward_hook(lambda m, a, o: tokens.append(a[0].shape[0]))

    def batches():
        for step in range(10**6):
            det, gen = _global_items(step)
            n = PER_STEP // ctx.world_size
            yield det[ctx.rank * n:(ctx.rank + 1) * n], gen[ctx.rank * n:(ctx.rank + 1) * n]

    stamps = []

    def log_fn(step, losses):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    train_gduf(model, batches(), GDUFConfig(steps=WARMUP + TIMED + 1, lr=1e-4, seed=0), log_fn,
               run=RunOptions(ctx))
    step_s = statistics.median(b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:]))
    local = torch.tensor(float(statistics.mean(tokens[WARMUP:])), device=ctx.device)
    total = float(dist.all_reduce_sum(local, ctx))
    if ctx.is_main:
        Path(out).write_text(json.dumps({"step_s": step_s, "tokens": total, "tokens_per_s": total / step_s,
                                         "world": ctx.world_size, "device": str(ctx.device)}))
    dist.teardown(ctx)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig
    d = tmp_path_factory.mktemp("tiny")
    UniGenDet(UniGenDetConfig.named("tiny"), seed=0).save_pretrained(d)
    return d


@pytest.mark.parametrize("world", [1, 2], ids=["single", "fsdp2x2"])
def test_gduf_step_tokens_per_s(benchmark, source, tmp_path, world):
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, str(source), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the installed aigid, as every other benchmark

    def launch():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    benchmark.pedantic(launch, rounds=1, iterations=1)
    result = json.loads(out.read_text())
    benchmark.extra_info.update(result)
    benchmark.extra_info["cpu_load_1min"] = os.getloadavg()[0]
    try:
        from _report import record_comparison
        record_comparison(benchmark, case="gduf-step", name="fsdp2x2" if world == 2 else "single",
                          ours=world == 2, means="2 FSDP2 ranks, half batch each" if world == 2
                          else "1 process, whole batch")
    except ImportError:
        pass


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
