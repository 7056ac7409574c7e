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
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from aigid.data.dataset import LabelledImages, collate_skipping_errors
from aigid.data.labelled import discover, has_split, summarise, warn_format_bias
from aigid.data.transforms import train_transform
from aigid.evaluate import device_of, evaluate
from aigid.models.checkpoint import apply_umask

if TYPE_CHECKING:  # the model is imported when training starts: open_clip is slow to import
    from aigid.models.mirage import MiraGe

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX, CHECKPOINT_FILE = ".partial", "checkpoint.safetensors"
LOG_FILE, SUMMARY_FILE = "train_log.jsonl", "train_summary.json"
# Files that mark a folder as a detector (or our run), which overwrite=True may replace.
_DETECTOR_FILES = ("config.json", "model.safetensors", LOG_FILE, SUMMARY_FILE, CHECKPOINT_FILE)
# TrainConfig fields that decide the result: a resumed run must use the values it started with.
_RESUME_FIELDS = ("model", "overrides", "epochs", "max_steps", "batch_size", "lr", "momentum",
                  "weight_decay", "warmup_epochs", "warmup_lr", "seed")
_CHECKPOINT_FORMAT = "aigid-train-checkpoint/1"


@dataclass
class TrainConfig:
    data: str                               # labelled folder or manifest (train/ split used if present)
    out: str = "runs/mirage"                # the detector folder to write (swapped in at the end)
    val: Optional[str] = None               # held-out data; default: the data's val/ split if present
    model: str = "vit-l-14"                 # shipped config name, a JSON config file, or a detector dir
    overrides: dict[str, Any] = field(default_factory=dict)  # MiraGeConfig fields (alpha, bank_size...)
    cache_dir: Optional[str] = None         # open_clip weights cache
    download: bool = False                  # fetch a missing backbone tag (never by default)
    epochs: int = 5                         # MaPLe MAX_EPOCH
    max_steps: Optional[int] = None         # stop early after this many optimiser steps
    batch_size: int = 32                    # ours (MaPLe: 4)
    lr: float = 0.0035                      # MaPLe
    momentum: float = 0.9                   # MaPLe (Dassl's SGD default)
    weight_decay: float = 5e-4              # MaPLe (Dassl's default)
    warmup_epochs: int = 0                  # ours: no warmup (MaPLe: 1)
    warmup_lr: float = 1e-5                 # constant lr during warmup (MaPLe WARMUP_CONS_LR)
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    checkpoint_every: int = 500             # steps between checkpoints in <out>.partial (0: only on Ctrl-C)
    resume: bool = False                    # continue the interrupted run checkpointed in <out>.partial
    overwrite: bool = False                 # replace an existing detector folder at <out>


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``train``; the state is saved in ``checkpoint`` (``resume=True`` goes on).
    A KeyboardInterrupt, so code that treats Ctrl-C as "stop" still does."""

    def __init__(self, message: str, checkpoint: str, step: int):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


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


# ---- checkpoints -----------------------------------------------------------------------------
@dataclass
class _Progress:
    step: int = 0
    epoch: int = 0
    batch: int = 0          # batches of ``epoch`` already taken
    seconds: float = 0.0    # training time of the earlier segments of a resumed run
    errors: dict[str, str] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _fingerprint(cfg: TrainConfig, items: list) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the settings that shape the
    result, and the image list (relative to the data root, so another spelling of it is fine)."""
    listing = json.dumps([(os.path.relpath(s.path, cfg.data), s.label) for s in items])
    return {**_jsonable({k: getattr(cfg, k) for k in _RESUME_FIELDS}), "n_items": len(items),
            "items_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16]}


def _write_checkpoint(path: str, model: MiraGe, opt: torch.optim.Optimizer, prog: _Progress,
                      log_bytes: int, fingerprint: dict[str, Any]) -> None:
    """Everything the next step depends on, in one safetensors file (tensors + JSON metadata),
    written to a temporary file beside ``path`` and renamed over it: a crash leaves the old one."""
    tensors = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    feats, labels = model.bank.feats, model.bank.labels
    tensors["bank.feats"], tensors["bank.labels"] = feats.detach().cpu().clone(), labels.cpu().clone()
    optim_state: dict[str, dict[str, Any]] = {}
    for index, entry in opt.state_dict()["state"].items():
        optim_state[str(index)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().clone()
            else:
                optim_state[str(index)][name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "format": _CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": prog.step,
        "epoch": prog.epoch, "batch": prog.batch, "seconds": prog.seconds, "errors": prog.errors,
        "resumed_at": prog.resumed_at, "log_bytes": log_bytes,
        "bank": {"filled": model.bank.filled, "head": model.bank.head},
        "optim": {"state": optim_state, "param_groups": opt.state_dict()["param_groups"]},
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "rng_python": _jsonable(random.getstate()),
    }
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"aigid": json.dumps(meta)})
        with open(tmp, "rb+") as f:  # on disk before it replaces the last good checkpoint
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _Checkpointer:
    """Saves the run's state to ``path``; remembers the step last saved, and the training time."""

    def __init__(self, path: str, log_path: str, model: MiraGe, opt: torch.optim.Optimizer,
                 prog: _Progress, fingerprint: dict[str, Any]):
        self.path, self.log_path, self.model, self.opt = path, log_path, model, opt
        self.prog, self.fingerprint = prog, fingerprint
        self.saved_step = prog.step if prog.resumed_at else -1
        self._base, self._started = prog.seconds, time.time()

    def clock(self) -> None:
        self.prog.seconds = self._base + time.time() - self._started

    def save(self) -> None:
        self.clock()
        _write_checkpoint(self.path, self.model, self.opt, self.prog,
                          os.path.getsize(self.log_path), self.fingerprint)
        self.saved_step = self.prog.step


def _read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["aigid"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable aigid training checkpoint ({e}); "
                         f"start over with overwrite=True (--overwrite)") from e
    if meta.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta, tensors


def _restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: MiraGe,
             opt: torch.optim.Optimizer) -> _Progress:
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = set(model.trainable_state_dict())
    if set(weights) != expected:
        raise ValueError(f"checkpoint tensors {sorted(set(weights) ^ expected)} do not match the model")
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        model.bank.feats.copy_(tensors["bank.feats"])
        model.bank.labels.copy_(tensors["bank.labels"])
    model.bank.filled, model.bank.head = meta["bank"]["filled"], meta["bank"]["head"]
    state = {int(i): dict(entry) for i, entry in meta["optim"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["optim"]["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["rng_numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss_next))
    return _Progress(step=meta["step"], epoch=meta["epoch"], batch=meta["batch"],
                     seconds=meta["seconds"], errors=dict(meta["errors"]),
                     resumed_at=[*meta["resumed_at"], meta["step"]])


# ---- folders -----------------------------------------------------------------------------------
def _is_ours(folder: str) -> bool:
    """Empty, or holding a detector / training files: what overwrite=True may replace."""
    names = os.listdir(folder)
    return not names or any(n in names for n in _DETECTOR_FILES)


def _check_folders(cfg: TrainConfig, target: str, work: str) -> Optional[str]:
    """Check ``out`` and the work folder against overwrite/resume before any work starts (and
    change nothing); returns the checkpoint to resume from, or None. Raises naming the folder."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{cfg.out}: exists and is not a folder")
    if os.path.isdir(target) and os.listdir(target):
        if not _is_ours(target):
            raise FileExistsError(f"{cfg.out}: a non-empty folder that is not a detector; refusing to "
                                  "replace it even with --overwrite; choose another --out")
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out}: a detector folder already exists; pass --overwrite "
                                  "(overwrite=True) to replace it when training ends, or choose "
                                  "another --out")
    checkpoint = os.path.join(work, CHECKPOINT_FILE)
    if cfg.resume:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"{checkpoint}: no interrupted run to resume for --out {cfg.out}; "
                                    "run without --resume to start one")
        return checkpoint
    if os.path.isfile(checkpoint) and not cfg.overwrite:
        raise FileExistsError(f"{work}: holds an interrupted run for --out {cfg.out}; pass --resume to "
                              "continue it, or --overwrite (overwrite=True) to start over")
    return None


def _start_work(work: str, resuming: bool) -> None:
    """A fresh work folder for a new run (what an earlier one left there is discarded: the checks
    allowed it); a resumed one only loses temporary files of a write that was cut short."""
    if resuming:
        for name in os.listdir(work):
            if name.startswith(".checkpoint-") and name.endswith(".tmp"):
                os.remove(os.path.join(work, name))
        return
    if os.path.isfile(os.path.join(work, CHECKPOINT_FILE)):
        logger.warning("aigid train: discarding the interrupted run in %s (--overwrite)", work)
    if os.path.isdir(work):
        shutil.rmtree(work)
    elif os.path.lexists(work):
        os.remove(work)
    os.makedirs(work)


def _swap_in(work: str, target: str) -> None:
    """Put the finished folder at ``target``. A rename onto a non-empty folder is impossible, so
    an old folder is first renamed aside (and renamed back if the second rename fails)."""
    if not os.path.lexists(target):
        os.rename(work, target)
        return
    backup = target + ".old"
    if os.path.lexists(backup):
        shutil.rmtree(backup)
    os.rename(target, backup)
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _relative(path: str, root: Optional[str]) -> str:
    """``path`` relative to its data root when under it: the summary names images without
    absolute paths, and the data can move."""
    if root is None or not os.path.isdir(root):
        return path
    rel = os.path.relpath(path, root)
    return path if rel.startswith(os.pardir) else rel


def _interrupted(checkpoint: str, step: int, total: int) -> TrainingInterrupted:
    """Logs how to go on (the CLI may print only a one-line "interrupted") and makes the error."""
    message = (f"stopped at step {step}/{total}; the run is saved in {checkpoint}. Resume with the "
               f"same `aigid train ...` command plus --resume (Python: TrainConfig(..., resume=True))")
    logger.warning("aigid train: %s", message)
    return TrainingInterrupted(message, checkpoint, step)


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
    target = os.path.abspath(cfg.out)  # one spelling: "runs/x/" and "runs/x" are one folder
    work = target + PARTIAL_SUFFIX
    resume_from = _check_folders(cfg, target, work)
    _seed_everything(cfg.seed)
    device = device_of(cfg.device)
    split = "train" if has_split(cfg.data, "train") else None
    items = discover(cfg.data, split)
    labels = {s.label for s in items}
    if labels != {0, 1}:
        raise ValueError(f"{cfg.data}: training needs both real and fake images, found labels {labels}")
    fingerprint = _fingerprint(cfg, items)
    meta, saved = _read_checkpoint(resume_from) if resume_from else (None, None)
    if meta is not None and meta["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if meta["fingerprint"].get(k) != fingerprint[k])
        raise ValueError(f"{resume_from}: this run differs from the interrupted one in {changed}; "
                         "resume with the settings and data it started with, or --overwrite to start over")
    warn_format_bias(items)
    val = cfg.val or (cfg.data if has_split(cfg.data, "val") else None)
    val_split = "val" if val is not None and cfg.val is None else None

    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dataset = _SeededItems(LabelledImages(items, train_transform(model.config.preprocess)), cfg.seed)
    steps_per_epoch = len(_epoch_batches(len(items), cfg.batch_size, cfg.seed, 0))
    total = cfg.epochs * steps_per_epoch
    total = total if cfg.max_steps is None else min(cfg.max_steps, total)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

    _start_work(work, resuming=meta is not None)
    log_path = os.path.join(work, LOG_FILE)
    if meta is not None:
        prog = _restore(meta, saved, model, opt)
        os.truncate(log_path, meta["log_bytes"])  # drop steps logged after the checkpoint
        logger.info("aigid train: resuming %s at step %d/%d", cfg.out, prog.step, total)
    else:
        prog = _Progress()
    ckpt = _Checkpointer(os.path.join(work, CHECKPOINT_FILE), log_path, model, opt, prog, fingerprint)
    model.train()
    bar = tqdm(total=total, initial=prog.step, desc="train", unit="step", disable=not cfg.progress)
    # line-buffered: the file shows each step as it ends, and its size is what a checkpoint records
    log = open(log_path, "a" if meta is not None else "w", buffering=1)
    try:
        with _StopOnInterrupt() as stop:
            while prog.step < total and not stop.requested:
                batches = _epoch_batches(len(items), cfg.batch_size, cfg.seed, prog.epoch)[prog.batch:]
                loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                    collate_fn=collate_skipping_errors, pin_memory=device.type == "cuda",
                                    worker_init_fn=_ignore_sigint if cfg.num_workers else None)
                stepped = False
                for batch in loader:
                    prog.batch += 1
                    prog.errors.update({_relative(items[i].path, cfg.data): e for i, e in batch["errors"]})
                    if batch["pixels"] is not None and batch["labels"].numel() > 0:
                        _step(model, opt, batch, device, prog, total, warmup_steps, cfg, log, bar)
                        stepped = True
                    if prog.step >= total or stop.requested:
                        break
                    if cfg.checkpoint_every and prog.step % cfg.checkpoint_every == 0 \
                            and prog.step != ckpt.saved_step:
                        ckpt.save()
                else:  # the epoch ran to its end
                    if not stepped and len(batches) == steps_per_epoch:
                        raise ValueError(f"{cfg.data}: no training image could be read "
                                         f"({len(prog.errors)} unreadable files)")
                    prog.epoch, prog.batch = prog.epoch + 1, 0
            if stop.requested:
                ckpt.save()
                raise _interrupted(ckpt.path, prog.step, total)
    finally:
        bar.close()
        log.close()
    ckpt.clock()
    try:
        summary = _finish(cfg, model, items, val, val_split, split, prog, device, work, target)
    except BaseException as err:
        # Saving and evaluating change no training state: checkpoint it, so that a Ctrl-C here or
        # a full disk costs a resume with no steps left, not the training.
        try:
            ckpt.save()
        except Exception as also:
            logger.warning("aigid train: could not checkpoint the finished training either: %s", also)
            raise err
        if isinstance(err, KeyboardInterrupt):
            raise _interrupted(ckpt.path, prog.step, total) from None
        logger.warning("aigid train: training finished but writing the detector failed; the run is "
                       "saved in %s: fix the cause and rerun with --resume", ckpt.path)
        raise
    _swap_in(work, target)
    leftover = os.path.join(target, CHECKPOINT_FILE)  # removed after the swap: no state is ever lost
    if os.path.exists(leftover):
        os.remove(leftover)
    summary["detector"] = model
    return summary


def _step(model: MiraGe, opt: torch.optim.Optimizer, batch: dict[str, Any], device: torch.device,
          prog: _Progress, total: int, warmup_steps: int, cfg: TrainConfig, log: Any, bar: Any) -> None:
    pixels = batch["pixels"].to(device, non_blocking=True)
    y = batch["labels"].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model.training_loss(pixels, y)
    lr = scheduled_lr(prog.step, total, warmup_steps, cfg.lr, cfg.warmup_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    prog.step += 1
    acc = (out["logits"].argmax(-1) == y).float().mean().item()
    rec = {"step": prog.step, "loss": out["loss"].item(), "ce": out["ce"].item(),
           "dis": out["dis"].item(), "acc": acc, "lr": lr}  # the lr this step used
    log.write(json.dumps(rec) + "\n")
    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{acc:.2f}")
    bar.update(1)


def _finish(cfg: TrainConfig, model: MiraGe, items: list, val: Optional[str], val_split: Optional[str],
            split: Optional[str], prog: _Progress, device: torch.device, work: str,
            target: str) -> dict[str, Any]:
    """Write the detector and its summary into the work folder (nothing absolute: the folder
    must load wherever it is moved; the data paths are recorded as given)."""
    model.eval()
    model.save_pretrained(work)
    config = asdict(cfg)
    config["out"] = os.path.basename(target)
    summary: dict[str, Any] = {
        "config": config, "model": asdict(model.config), "steps": prog.step,
        "seconds": round(prog.seconds, 2), "device": str(device),
        "train_data": summarise(items), "train_split": split, "resumed_at_steps": prog.resumed_at,
        "skipped_files": [{"path": p, "error": e} for p, e in sorted(prog.errors.items())],
    }
    if val is not None:
        summary["val"] = evaluate(model, val, split=val_split, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, progress=cfg.progress)
        for err in summary["val"].get("errors", []):
            err["path"] = _relative(err["path"], val)
    with open(os.path.join(work, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
