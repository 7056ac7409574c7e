"""Training loop for MiraGe: SGD on the prompts only, bf16 autocast on CUDA, fp32 on CPU.

Optimiser defaults follow MaPLe, the prompt-learning code MiraGe builds on (upstream
``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``: SGD, lr 0.0035, momentum 0.9, weight
decay 5e-4, 5 epochs, cosine schedule); MiraGe's own paper does not list them.

The learning rate is set per optimiser step: ``warmup_epochs`` epochs at the constant
``warmup_lr`` (MaPLe: 1 epoch at 1e-5, Dassl's ConstantWarmupScheduler; our default: none), then
a cosine from ``lr`` down to 0 over the remaining steps. Dassl steps its schedule once per epoch
and, recounting after warmup, keeps the cosine's period at all MAX_EPOCH epochs, so MaPLe's run
ends at ~0.35·lr; we decay per step to 0 over the steps after warmup (our assumption), which
without warmup is exactly the schedule this loop always had.

Interrupt-safe: the run works in ``<out>.partial/`` (log + ``checkpoint.safetensors``) and the
finished folder is swapped into ``<out>`` at the end, so ``<out>`` only ever holds a complete
detector. Ctrl-C finishes the current step, writes the checkpoint and raises
:class:`TrainingInterrupted`; ``resume=True`` continues from it to the same result as a run that
was never stopped (the batch order and each image's augmentation are drawn from seeds keyed by
epoch and image, not from a stream that a restart would reset).

Data-parallel under ``torchrun --nproc_per_node N`` (or any initialised default process group):
``batch_size`` is per rank, and each global batch of N·batch_size (the batch one process would
draw with that size) is cut into contiguous per-rank slices; ``aigid.training.gather`` gathers the
embeddings so the loss, the step and the memory bank equal one process's with the global batch.
Only rank 0 touches ``out`` (folders, log, checkpoints, the detector); it reads the checkpoint
on resume and hands it to every rank, so ``out`` need not be on a shared file system.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from aigid.data.dataset import LabelledImages, collate_skipping_errors
from aigid.data.labelled import discover, has_split, summarise, warn_format_bias
from aigid.data.transforms import train_transform
from aigid.evaluation.runner import device_of, evaluate
from aigid.models.card import write_model_card
from aigid.training import gather as dist_gather
from aigid.training.config import TrainConfig
from aigid.training.state import (CHECKPOINT_FILE, LOG_FILE, PARTIAL_SUFFIX, SUMMARY_FILE, Checkpointer,
                                  Progress, TrainingInterrupted, check_folders, interrupted_error,
                                  read_checkpoint, relative_to, restore, run_fingerprint, start_work, swap_in)

__all__ = ["TrainConfig", "TrainingInterrupted", "train", "build_model", "scheduled_lr"]

if TYPE_CHECKING:  # the model is imported when training starts: open_clip is slow to import
    from aigid.models.mirage import MiraGe

logger = logging.getLogger(__name__)



def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def scheduled_lr(step: int, total: int, warmup_steps: int, lr: float, warmup_lr: float) -> float:
    """The lr of optimiser step ``step`` (0-based) of ``total``: constant ``warmup_lr`` for the
    first ``warmup_steps``, then a cosine from ``lr`` to 0 over the steps left."""
    if step < warmup_steps:
        return warmup_lr
    span = max(total - warmup_steps, 1)
    return 0.5 * lr * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def build_model(cfg: TrainConfig) -> "MiraGe":
    from aigid.models.mirage import MiraGe, MiraGeConfig

    if os.path.isdir(cfg.model):
        return MiraGe.from_pretrained(cfg.model, cache_dir=cfg.cache_dir, download=cfg.download)
    if os.path.isfile(cfg.model):
        with open(cfg.model) as f:
            mcfg = MiraGeConfig(**json.load(f))
    else:
        mcfg = MiraGeConfig.named(cfg.model)
    for key, value in cfg.overrides.items():
        if not hasattr(mcfg, key):
            raise ValueError(f"unknown MiraGe config field {key!r}")
        setattr(mcfg, key, value)
        if key in mcfg.sources:  # the shipped note described the default, not this value
            mcfg.sources[key] = "user override"
    return MiraGe(mcfg, cache_dir=cfg.cache_dir, seed=cfg.seed, download=cfg.download)


# ---- data order that survives a restart ----------------------------------------------------
def _mix(*ints: int) -> int:
    """A well-spread 32-bit seed from a tuple of ints (seed, epoch[, image])."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(1)[0])


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """Epoch ``epoch``'s shuffled batches of (epoch, image index) keys; a short last batch is
    dropped when there is more than one batch (as ``drop_last`` did)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch))).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return [[(epoch, i) for i in b] for b in batches]


class _SeededItems(Dataset):
    """Each (epoch, index) draws its random crop/flip from its own seed: the same augmentation
    whichever worker loads it and whether or not the run was stopped and resumed."""

    def __init__(self, images: LabelledImages, seed: int):
        self.images, self.seed = images, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, index))
            return self.images[index]


def _ignore_sigint(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides when to stop, and a
    # worker killed by it would fail the step that is being finished.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopOnInterrupt:
    """First Ctrl-C: finish the step, then checkpoint and stop. A second one stops at once."""

    def __enter__(self) -> "_StopOnInterrupt":
        self.requested, self._installed, self._previous = False, False, None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # honour a nohup-style ignore
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("aigid train: interrupted; finishing this step, then saving a checkpoint "
                       "(Ctrl-C again to stop without saving)")

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


# ---- the loop ------------------------------------------------------------------------------
def train(config: Union[TrainConfig, dict[str, Any]]) -> dict[str, Any]:
    """Train a detector; returns a summary (and writes it, the detector and metrics to ``out``).

    Refuses an existing detector folder at ``out`` unless ``overwrite``. Ctrl-C (SIGINT) raises
    :class:`TrainingInterrupted` after saving a checkpoint to ``<out>.partial/``, as do periodic
    checkpoints every ``checkpoint_every`` steps; ``resume=True`` continues from it.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    if cfg.warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be ≥ 0, got {cfg.warmup_epochs}")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be ≥ 0 (0: off), got {cfg.checkpoint_every}")
    device = _device(cfg.device)
    created = dist_gather.init_from_env(device)
    try:
        return _train(cfg, device)
    finally:
        if created:
            torch_dist.destroy_process_group()


def _device(name: str) -> torch.device:
    """``device_of``, except that a bare "cuda" under torchrun means this rank's LOCAL_RANK GPU."""
    device = device_of(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _train(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    rank, world = dist_gather.rank_and_world()
    target = os.path.abspath(cfg.out)  # one spelling: "runs/x/" and "runs/x" are one folder
    work = target + PARTIAL_SUFFIX
    resume_from = dist_gather.from_rank0(lambda: check_folders(cfg, target, work))
    _seed_everything(cfg.seed)
    split = "train" if has_split(cfg.data, "train") else None
    items = discover(cfg.data, split)
    labels = {s.label for s in items}
    if labels != {0, 1}:
        raise ValueError(f"{cfg.data}: training needs both real and fake images, found labels {labels}")
    fingerprint = run_fingerprint(cfg, items)
    if world > 1:  # the global batch depends on it (absent for one process: older checkpoints match)
        fingerprint["world_size"] = world
        if any(f != fingerprint for f in dist_gather.all_gather_objects(fingerprint)):
            raise ValueError(f"{cfg.data}: the ranks see different training images or settings; "
                             "every rank must read the same data with the same command")
    meta, saved = dist_gather.from_rank0(lambda: _read_resumable(resume_from, fingerprint))
    if rank == 0:
        warn_format_bias(items)
    val = cfg.val or (cfg.data if has_split(cfg.data, "val") else None)
    val_split = "val" if val is not None and cfg.val is None else None

    model = build_model(cfg).to(device)
    if world > 1:
        dist_gather.broadcast_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dataset = _SeededItems(LabelledImages(items, train_transform(model.config.preprocess)), cfg.seed)
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(_epoch_batches(len(items), global_batch, cfg.seed, 0))
    total = cfg.epochs * steps_per_epoch
    total = total if cfg.max_steps is None else min(cfg.max_steps, total)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

    log_path = os.path.join(work, LOG_FILE)
    dist_gather.from_rank0(lambda: _start_work(work, log_path, meta))
    if meta is not None:
        prog = restore(meta, saved, model, opt)
        if rank == 0:
            logger.info("aigid train: resuming %s at step %d/%d", cfg.out, prog.step, total)
    else:
        prog = Progress()
    ckpt = Checkpointer(os.path.join(work, CHECKPOINT_FILE), log_path, model, opt, prog, fingerprint)
    model.train()
    bar = tqdm(total=total, initial=prog.step, desc="train", unit="step",
               disable=not cfg.progress or rank != 0)
    # line-buffered: the file shows each step as it ends, and its size is what a checkpoint records
    log = open(log_path if rank == 0 else os.devnull, "a" if meta is not None else "w", buffering=1)
    try:
        with _StopOnInterrupt() as stop:
            stopped = False  # a stop every rank agreed on (one process: its own Ctrl-C)
            while prog.step < total and not stopped:
                batches = _epoch_batches(len(items), global_batch, cfg.seed, prog.epoch)[prog.batch:]
                mine = [dist_gather.rank_slice(b, rank, world) for b in batches]
                loader = DataLoader(dataset, batch_sampler=mine, num_workers=cfg.num_workers,
                                    collate_fn=collate_skipping_errors, pin_memory=device.type == "cuda",
                                    worker_init_fn=_ignore_sigint if cfg.num_workers else None)
                stepped = False
                for batch in loader:
                    prog.batch += 1
                    sizes, errors = _share(batch)
                    prog.errors.update({relative_to(items[i].path, cfg.data): e for i, e in errors})
                    if sum(sizes) > 0:
                        _step(model, opt, params, batch, sizes if world > 1 else None, device, prog,
                              total, warmup_steps, cfg, log, bar)
                        stepped = True
                    stopped = dist_gather.any_rank(stop.requested)
                    if prog.step >= total or stopped:
                        break
                    if cfg.checkpoint_every and prog.step % cfg.checkpoint_every == 0 \
                            and prog.step != ckpt.saved_step:
                        _save(ckpt)
                else:  # the epoch ran to its end
                    if not stepped and len(batches) == steps_per_epoch:
                        raise ValueError(f"{cfg.data}: no training image could be read "
                                         f"({len(prog.errors)} unreadable files)")
                    prog.epoch, prog.batch = prog.epoch + 1, 0
                    stopped = dist_gather.any_rank(stop.requested)
            if stopped:
                _save(ckpt)
                raise interrupted_error(ckpt.path, prog.step, total)
    finally:
        bar.close()
        log.close()
    ckpt.clock()
    summary = dist_gather.from_rank0(
        lambda: _finish_and_swap(cfg, model, items, val, val_split, split, prog, device, work,
                                 target, ckpt, total, world))
    model.eval()
    summary["detector"] = model
    return summary


def _read_resumable(resume_from: Optional[str], fingerprint: dict[str, Any]) -> tuple[Any, Any]:
    """The checkpoint to resume from (meta, tensors), or (None, None); refuses a changed run."""
    if resume_from is None:
        return None, None
    meta, saved = read_checkpoint(resume_from)
    if meta["fingerprint"] != fingerprint:
        keys = set(fingerprint) | set(meta["fingerprint"])
        changed = sorted(k for k in keys if meta["fingerprint"].get(k) != fingerprint.get(k))
        raise ValueError(f"{resume_from}: this run differs from the interrupted one in {changed}; "
                         "resume with the settings and data it started with, or --overwrite to start over")
    return meta, saved


def _start_work(work: str, log_path: str, meta: Optional[dict[str, Any]]) -> None:
    start_work(work, resuming=meta is not None)
    if meta is not None:
        os.truncate(log_path, meta["log_bytes"])  # drop steps logged after the checkpoint


def _save(ckpt: Checkpointer) -> None:
    """Rank 0 writes the checkpoint; every rank records the step, so all decide alike next time."""
    dist_gather.from_rank0(ckpt.save)
    ckpt.saved_step = ckpt.prog.step


def _share(batch: dict[str, Any]) -> tuple[list[int], list[tuple[int, str]]]:
    """Each rank's readable-image count and every rank's unreadable files: all ranks then agree
    whether to step and keep the same skip list."""
    n = 0 if batch["pixels"] is None else int(batch["labels"].numel())
    every = dist_gather.all_gather_objects((n, batch["errors"]))
    return [k for k, _ in every], [e for _, errs in every for e in errs]


def _finish_and_swap(cfg: TrainConfig, model: MiraGe, items: list, val: Optional[str],
                     val_split: Optional[str], split: Optional[str], prog: Progress,
                     device: torch.device, work: str, target: str, ckpt: Checkpointer, total: int,
                     world: int) -> dict[str, Any]:
    """Write the detector and swap it into ``target`` (rank 0); returns the summary."""
    try:
        summary = _finish(cfg, model, items, val, val_split, split, prog, device, work, target, world)
    except BaseException as err:
        # Saving and evaluating change no training state: checkpoint it, so that a Ctrl-C here or
        # a full disk costs a resume with no steps left, not the training.
        try:
            ckpt.save()
        except Exception as also:
            logger.warning("aigid train: could not checkpoint the finished training either: %s", also)
            raise err
        if isinstance(err, KeyboardInterrupt):
            raise interrupted_error(ckpt.path, prog.step, total) from None
        logger.warning("aigid train: training finished but writing the detector failed; the run is "
                       "saved in %s: fix the cause and rerun with --resume", ckpt.path)
        raise
    swap_in(work, target)
    leftover = os.path.join(target, CHECKPOINT_FILE)  # removed after the swap: no state is ever lost
    if os.path.exists(leftover):
        os.remove(leftover)
    return summary


def _step(model: MiraGe, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
          batch: dict[str, Any], sizes: Optional[list[int]], device: torch.device, prog: Progress,
          total: int, warmup_steps: int, cfg: TrainConfig, log: Any, bar: Any) -> None:
    """One optimiser step; ``sizes`` (each rank's rows) under data parallelism, else None."""
    pixels = batch["pixels"]
    # a rank whose slice held no readable image still joins the step, with 0 rows
    pixels = torch.empty(0, device=device) if pixels is None else pixels.to(device, non_blocking=True)
    y = batch["labels"].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if sizes is None:
            out = model.training_loss(pixels, y)
        else:
            out = model.training_loss(pixels, y, dist_gather.gatherer(sizes))
            y = out["labels"]  # the global batch's
    lr = scheduled_lr(prog.step, total, warmup_steps, cfg.lr, cfg.warmup_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if sizes is not None:
        dist_gather.average_gradients(params)
    opt.step()
    prog.step += 1
    acc = (out["logits"].argmax(-1) == y).float().mean().item()
    rec = {"step": prog.step, "loss": out["loss"].item(), "ce": out["ce"].item(),
           "dis": out["dis"].item(), "acc": acc, "lr": lr}  # the lr this step used
    log.write(json.dumps(rec) + "\n")
    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{acc:.2f}")
    bar.update(1)


def _finish(cfg: TrainConfig, model: MiraGe, items: list, val: Optional[str], val_split: Optional[str],
            split: Optional[str], prog: Progress, device: torch.device, work: str,
            target: str, world: int = 1) -> dict[str, Any]:
    """Write the detector and its summary into the work folder (nothing absolute: the folder
    must load wherever it is moved; the data paths are recorded as given)."""
    model.eval()
    model.save_pretrained(work)
    config = asdict(cfg)
    config["out"] = os.path.basename(target)
    summary: dict[str, Any] = {
        "config": config, "model": asdict(model.config), "steps": prog.step,
        "seconds": round(prog.seconds, 2), "device": str(device), "world_size": world,
        "train_data": summarise(items), "train_split": split, "resumed_at_steps": prog.resumed_at,
        "skipped_files": [{"path": p, "error": e} for p, e in sorted(prog.errors.items())],
    }
    if val is not None:
        summary["val"] = evaluate(model, val, split=val_split, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, progress=cfg.progress)
        for err in summary["val"].get("errors", []):
            err["path"] = relative_to(err["path"], val)
    with open(os.path.join(work, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    write_model_card(work, model, summary)  # the card now names the training data and val metrics
    return summary
