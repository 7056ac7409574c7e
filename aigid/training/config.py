"""``TrainConfig``: what a MiraGe training run takes (``aigid.train``'s options), in a module of its
own so the loop (:mod:`aigid.training.mirage`) and its checkpointing (:mod:`aigid.training.state`)
both read it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


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
