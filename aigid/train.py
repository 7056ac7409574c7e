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
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aigid.data.dataset import LabelledImages, collate_skipping_errors
from aigid.data.labelled import discover, has_split, summarise, warn_format_bias
from aigid.data.transforms import train_transform
from aigid.evaluate import device_of, evaluate
from aigid.models.mirage import MiraGe, MiraGeConfig


@dataclass
class TrainConfig:
    data: str                               # labelled folder or manifest (train/ split used if present)
    out: str = "runs/mirage"                # where the detector and logs are written
    val: Optional[str] = None               # held-out data; default: the data's val/ split if present
    model: str = "vit-l-14"                 # shipped config name, a JSON config file, or a detector dir
    overrides: dict[str, Any] = field(default_factory=dict)  # MiraGeConfig fields (alpha, bank_size...)
    cache_dir: Optional[str] = None         # open_clip weights cache
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


def build_model(cfg: TrainConfig) -> MiraGe:
    if os.path.isdir(cfg.model):
        return MiraGe.from_pretrained(cfg.model, cache_dir=cfg.cache_dir)
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
    return MiraGe(mcfg, cache_dir=cfg.cache_dir, seed=cfg.seed)


def train(config: Union[TrainConfig, dict[str, Any]]) -> dict[str, Any]:
    """Train a detector; returns a summary (and writes it, the detector and metrics to ``out``)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    if cfg.warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be ≥ 0, got {cfg.warmup_epochs}")
    _seed_everything(cfg.seed)
    device = device_of(cfg.device)
    split = "train" if has_split(cfg.data, "train") else None
    items = discover(cfg.data, split)
    labels = {s.label for s in items}
    if labels != {0, 1}:
        raise ValueError(f"{cfg.data}: training needs both real and fake images, found labels {labels}")
    warn_format_bias(items)
    val = cfg.val or (cfg.data if has_split(cfg.data, "val") else None)
    val_split = "val" if val is not None and cfg.val is None else None

    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = DataLoader(LabelledImages(items, train_transform(model.config.preprocess)),
                        batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        collate_fn=collate_skipping_errors, drop_last=len(items) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        pin_memory=device.type == "cuda")
    total = cfg.epochs * len(loader)
    total = total if cfg.max_steps is None else min(cfg.max_steps, total)
    warmup_steps = cfg.warmup_epochs * len(loader)

    os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "train_log.jsonl"), "w")
    errors: dict[str, str] = {}
    step, started = 0, time.time()
    model.train()
    bar = tqdm(total=total, desc="train", unit="step", disable=not cfg.progress)
    while step < total:
        for batch in loader:
            errors.update({items[i].path: e for i, e in batch["errors"]})
            if batch["pixels"] is None or batch["labels"].numel() == 0:
                continue
            pixels = batch["pixels"].to(device, non_blocking=True)
            y = batch["labels"].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model.training_loss(pixels, y)
            lr = scheduled_lr(step, total, warmup_steps, cfg.lr, cfg.warmup_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            step += 1
            acc = (out["logits"].argmax(-1) == y).float().mean().item()
            rec = {"step": step, "loss": out["loss"].item(), "ce": out["ce"].item(),
                   "dis": out["dis"].item(), "acc": acc, "lr": lr}  # the lr this step used
            log.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{acc:.2f}")
            bar.update(1)
            if step >= total:
                break
    bar.close()
    log.close()
    model.eval()
    model.save_pretrained(cfg.out)

    summary: dict[str, Any] = {
        "config": asdict(cfg), "model": asdict(model.config), "steps": step,
        "seconds": round(time.time() - started, 2), "device": str(device),
        "train_data": summarise(items), "train_split": split,
        "skipped_files": [{"path": p, "error": e} for p, e in sorted(errors.items())],
    }
    if val is not None:
        summary["val"] = evaluate(model, val, split=val_split, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, progress=cfg.progress)
    with open(os.path.join(cfg.out, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    summary["detector"] = model
    return summary
