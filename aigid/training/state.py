"""What a training run keeps on disk, and where: its checkpoint (everything a resumed run needs to
end exactly where an uninterrupted one would) and the detector folder, built in
``<out>.partial/`` and swapped into ``<out>`` whole. Used by :mod:`aigid.training.mirage`."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aigid.models.checkpoint import apply_umask

if TYPE_CHECKING:
    from aigid.models.mirage import MiraGe
    from aigid.training.config import TrainConfig

logger = logging.getLogger("aigid.train")

PARTIAL_SUFFIX, CHECKPOINT_FILE = ".partial", "checkpoint.safetensors"
LOG_FILE, SUMMARY_FILE = "train_log.jsonl", "train_summary.json"
# Files that mark a folder as a detector (or our run), which overwrite=True may replace.
_DETECTOR_FILES = ("config.json", "model.safetensors", LOG_FILE, SUMMARY_FILE, CHECKPOINT_FILE)
# TrainConfig fields that decide the result: a resumed run must use the values it started with.
_RESUME_FIELDS = ("model", "overrides", "epochs", "max_steps", "batch_size", "lr", "momentum",
                  "weight_decay", "warmup_epochs", "warmup_lr", "seed")
_CHECKPOINT_FORMAT = "aigid-train-checkpoint/1"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``train``; the state is saved in ``checkpoint`` (``resume=True`` goes on).
    A KeyboardInterrupt, so code that treats Ctrl-C as "stop" still does."""

    def __init__(self, message: str, checkpoint: str, step: int):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


# ---- checkpoints -----------------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch: int = 0          # batches of ``epoch`` already taken
    seconds: float = 0.0    # training time of the earlier segments of a resumed run
    errors: dict[str, str] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def run_fingerprint(cfg: TrainConfig, items: list) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the settings that shape the
    result, and the image list (relative to the data root, so another spelling of it is fine)."""
    listing = json.dumps([(os.path.relpath(s.path, cfg.data), s.label) for s in items])
    return {**_jsonable({k: getattr(cfg, k) for k in _RESUME_FIELDS}), "n_items": len(items),
            "items_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16]}


def _write_checkpoint(path: str, model: MiraGe, opt: torch.optim.Optimizer, prog: Progress,
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


class Checkpointer:
    """Saves the run's state to ``path``; remembers the step last saved, and the training time."""

    def __init__(self, path: str, log_path: str, model: MiraGe, opt: torch.optim.Optimizer,
                 prog: Progress, fingerprint: dict[str, Any]):
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


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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


def restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: MiraGe,
             opt: torch.optim.Optimizer) -> Progress:
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
    return Progress(step=meta["step"], epoch=meta["epoch"], batch=meta["batch"],
                     seconds=meta["seconds"], errors=dict(meta["errors"]),
                     resumed_at=[*meta["resumed_at"], meta["step"]])


# ---- folders -----------------------------------------------------------------------------------
def _is_ours(folder: str) -> bool:
    """Empty, or holding a detector / training files: what overwrite=True may replace."""
    names = os.listdir(folder)
    return not names or any(n in names for n in _DETECTOR_FILES)


def check_folders(cfg: TrainConfig, target: str, work: str) -> Optional[str]:
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


def start_work(work: str, resuming: bool) -> None:
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


def swap_in(work: str, target: str) -> None:
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


def relative_to(path: str, root: Optional[str]) -> str:
    """``path`` relative to its data root when under it: the summary names images without
    absolute paths, and the data can move."""
    if root is None or not os.path.isdir(root):
        return path
    rel = os.path.relpath(path, root)
    return path if rel.startswith(os.pardir) else rel


def interrupted_error(checkpoint: str, step: int, total: int) -> TrainingInterrupted:
    """Logs how to go on (the CLI may print only a one-line "interrupted") and makes the error."""
    message = (f"stopped at step {step}/{total}; the run is saved in {checkpoint}. Resume with the "
               f"same `aigid train ...` command plus --resume (Python: TrainConfig(..., resume=True))")
    logger.warning("aigid train: %s", message)
    return TrainingInterrupted(message, checkpoint, step)
