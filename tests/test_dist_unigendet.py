"""UniGenDet under torchrun: 2 gloo processes on CPU against one process with the global batch.

The test launches ``torchrun --standalone --nproc_per_node 2`` on this file; run as a script it is
the worker (``_worker``). Each rank takes its half of every step's global batch; the single-process
reference trains on the whole batch with the plain ``train_gduf``/``train_diga``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.training.unigendet.common import DetectionItem, DIGAConfig, GDUFConfig, GenerationItem
from aigid.training.unigendet.gduf import train_gduf
from aigid.training.unigendet.diga import train_diga

WORLD = 2
STEPS = 4
PER_RANK = 2          # detection and generation items per rank and step (paired 1:1)
# eps 1e-6: Adam turns fp32 rounding noise in near-zero gradients (different summation orders on
# 1 vs 2 ranks) into steps of up to ~lr·|g|/eps; a larger eps keeps that below the 1e-5 tolerance.
GDUF = dict(steps=STEPS, lr=5e-3, weight_decay=1e-2, eps=1e-6, text_dropout=0.5, grad_clip=1.0, ema_decay=0.9, seed=3)
DIGA = dict(steps=3, lr=5e-3, eps=1e-6, text_dropout=0.5, grad_clip=1.0, ema_decay=0.9, layer=1, seed=5)


def _step_items(step: int) -> tuple[list[DetectionItem], list[GenerationItem]]:
    """The global batch of ``step``: WORLD·PER_RANK detection and generation items; the first of
    each rank's share has no latents (its VAE posterior sample draws a seed from the run)."""
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * PER_RANK
    pix = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    lat = torch.randn(n, 4, 4, 4, generator=g)
    det = [DetectionItem(pix[i], i % 2, "fake: noise" if i % 2 else "real", None if i % PER_RANK == 0 else lat[i])
           for i in range(n)]
    gen = [GenerationItem(f"image {i}", pix[i], None if i % PER_RANK == 0 else lat[i]) for i in range(n)]
    return det, gen


def _rank_items(step: int, rank: int, world: int):
    det, gen = _step_items(step)
    share = len(det) // world
    return det[rank * share:(rank + 1) * share], gen[rank * share:(rank + 1) * share]


# ---- the worker (one torchrun rank) ---------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    from aigid.training import dist
    from aigid.training.dist import latest_checkpoint
    from aigid.training.unigendet.common import RunOptions
    from aigid.training.unigendet.shard import build_sharded, build_teacher, export_pretrained

    torch.set_num_threads(1)
    ctx = dist.init()
    start = 0
    found = latest_checkpoint(args.ckpt) if args.ckpt else None
    if found is not None:
        start = found[1]["data"]["next_step"]
    pos = {"next_step": start}

    def batches():
        for step in range(start, 10**6):
            det, gen = _rank_items(step, ctx.rank, ctx.world_size)
            pos["next_step"] = step + 1
            yield (det, gen) if args.stage == "gduf" else gen

    def log_fn(step, losses):
        if step == args.kill_at:      # die mid-run, after the last checkpoint, without any clean-up
            os._exit(17)

    run = RunOptions(ctx, checkpoint_dir=args.ckpt, checkpoint_every=args.every, data_state=lambda: dict(pos))
    model = build_sharded(args.source, ctx, gradient_checkpointing=args.gc)
    if args.stage == "gduf":
        history, ema = train_gduf(model, batches(), GDUFConfig(**GDUF, gradient_checkpointing=args.gc), log_fn, run=run)
    else:
        teacher = build_teacher(args.source, ctx)
        _, history, ema = train_diga(model, batches(), DIGAConfig(**DIGA), log_fn, teacher, run=run)
    export_pretrained(model, os.path.join(args.out, "model"), ctx)
    export_pretrained(model, os.path.join(args.out, "ema"), ctx, ema=ema)
    if ctx.is_main:
        Path(args.out, "history.json").write_text(json.dumps(history))
    dist.teardown(ctx)


def _launch(tmp: Path, source: Path, out: Path, stage: str, *, ckpt: Path | None = None, every: int = 0,
            kill_at: int = -1, gc: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", __file__,
           "--stage", stage, "--source", str(source), "--out", str(out), "--every", str(every),
           "--kill-at", str(kill_at)] + (["--ckpt", str(ckpt)] if ckpt else []) + (["--gc"] if gc else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)


# ---- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """unigendet-tiny with its seeded VAE, saved: the one set of starting weights for every run."""
    d = tmp_path_factory.mktemp("tiny")
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    model.vae  # built, so it is saved (VAE posterior samples are part of the runs)
    model.save_pretrained(d)
    return d


def _single(source: Path, stage: str):
    """The reference: one process, the whole global batch each step."""
    torch.manual_seed(0)
    model = UniGenDet.from_pretrained(source)
    if stage == "gduf":
        history, ema = train_gduf(model, (_step_items(s) for s in range(STEPS)), GDUFConfig(**GDUF))
    else:
        teacher = UniGenDet.from_pretrained(source).eval().requires_grad_(False)
        _, history, ema = train_diga(model, (_step_items(s)[1] for s in range(10)), DIGAConfig(**DIGA), teacher=teacher)
    ema_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema_sd.update(ema.shadow)
    return history, model.state_dict(), ema_sd


@pytest.fixture(scope="module")
def gduf_runs(source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gduf")
    proc = _launch(tmp, source, tmp / "out", "gduf", gc=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "out", _single(source, "gduf")


def _assert_same_weights(folder: Path, reference: dict, atol: float = 1e-5) -> None:
    loaded = UniGenDet.from_pretrained(folder).state_dict()
    assert loaded.keys() == reference.keys()
    worst = max((loaded[k].float() - reference[k].float()).abs().max().item() for k in reference)
    assert worst < atol, worst


def _assert_same_history(out: Path, history: list[dict]) -> None:
    dist_history = json.loads((out / "history.json").read_text())
    assert len(dist_history) == len(history)
    for a, b in zip(dist_history, history):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)


def test_gduf_two_ranks_match_one_process_with_the_global_batch(gduf_runs, source):
    """2 ranks × half the batch == 1 process × the whole batch: losses, weights, EMA; and the export
    loads in one process. Catches: losses averaged per rank instead of normalised by the global
    token/sample counts, FSDP's gradient averaging left unscaled (half-sized steps), each rank
    drawing its own timesteps/noise/CFG drops/VAE seeds instead of its slice of the global draws,
    EMA taken over unsharded copies, an export with sharded or renamed keys. Also runs the ranks
    with activation checkpointing (the reference without), so recomputation under FSDP is covered."""
    out, (history, final, ema) = gduf_runs
    _assert_same_history(out, history)
    before = UniGenDet.from_pretrained(source).state_dict()
    assert max((final[k] - before[k]).abs().max().item() for k in final) > 1e-3   # it trained
    _assert_same_weights(out / "model", final)
    _assert_same_weights(out / "ema", ema)


def test_killed_run_resumes_to_the_uninterrupted_weights(gduf_runs, source, tmp_path):
    """A run killed (os._exit, no clean-up) in step 3 after the step-2 checkpoint, then relaunched,
    ends where the uninterrupted run ends. Catches: optimizer moments, scheduler, EMA or the run's
    random generator not checkpointed/restored, the data position not saved, an interrupted save
    being resumed from, the optimizer state not loadable (stage-unused modules not frozen)."""
    out, _ = gduf_runs
    ckpt = tmp_path / "ckpt"
    killed = _launch(tmp_path, source, tmp_path / "killed", "gduf", ckpt=ckpt, every=2, kill_at=3)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "history.json").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002"]
    resumed = _launch(tmp_path, source, tmp_path / "resumed", "gduf", ckpt=ckpt, every=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert len(json.loads((tmp_path / "resumed" / "history.json").read_text())) == STEPS - 2
    full = {k: v for k, v in UniGenDet.from_pretrained(out / "model").state_dict().items()}
    _assert_same_weights(tmp_path / "resumed" / "model", full, atol=1e-6)
    full_ema = UniGenDet.from_pretrained(out / "ema").state_dict()
    _assert_same_weights(tmp_path / "resumed" / "ema", full_ema, atol=1e-6)


def test_diga_two_ranks_match_one_process(source, tmp_path):
    """DIGA with a separately built, sharded, frozen teacher: 2 ranks == 1 process with the global
    batch. Catches: the teacher deep-copied from (or sharing storage with) the sharded student, the
    alignment/flow losses averaged per rank, the teacher's SigLIP pass differing between ranks."""
    proc = _launch(tmp_path, source, tmp_path / "out", "diga")
    assert proc.returncode == 0, proc.stderr[-4000:]
    history, final, ema = _single(source, "diga")
    _assert_same_history(tmp_path / "out", history)
    _assert_same_weights(tmp_path / "out" / "model", final)
    _assert_same_weights(tmp_path / "out" / "ema", ema)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=("gduf", "diga"))
    p.add_argument("--source")
    p.add_argument("--out")
    p.add_argument("--ckpt")
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--gc", action="store_true")
    _worker(p.parse_args())
