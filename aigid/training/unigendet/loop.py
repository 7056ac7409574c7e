"""The optimisation loop both UniGenDet stages run (:func:`_run`): optimiser, warm-up schedule, EMA,
DCP checkpoints and resume.

Distributed (``torchrun``, :mod:`aigid.training.dist`): :func:`build_sharded` builds the model on the meta
device, ``fully_shard``s every MoT decoder layer and SigLIP encoder layer and then the root on the
``(replicate, shard)`` mesh (hybrid sharding; bf16 compute with fp32 gradient reduction on CUDA),
and loads the weights read by rank 0. Both trainers (:func:`~aigid.training.unigendet.gduf.train_gduf`, ``train_diga`` in
:mod:`aigid.training.unigendet.diga`) take ``run=RunOptions(ctx, checkpoint_dir, ...)``. Every loss
is a sum over this rank's samples/tokens divided by the count summed over all ranks, and every
random draw (VAE posterior seeds, timesteps, noise, CFG drop) is drawn for the whole global batch
on every rank and sliced: N ranks × local batch b reproduce one process with the concatenated
batch (the ranks' batches in rank order), losses and weights alike. DIGA's teacher comes from
:func:`build_teacher`. Checkpoints (``torch.distributed.checkpoint``) hold model, optimizer,
scheduler, EMA, the run's generator and the caller's data position; :func:`export_pretrained`
writes a ``from_pretrained`` folder with BAGEL's key names from rank 0.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from aigid import backends
from aigid.models.unigendet import UniGenDet
from aigid.training import dist as adist
from aigid.training.dist import DistContext
from aigid.training.unigendet.common import EMA, STAGE_UNUSED, GDUFConfig, RunOptions
from aigid.training.unigendet.shard import full_tensor, is_dtensor, is_sharded

log = logging.getLogger("aigid.training.unigendet")


def _optimizer(params: list[nn.Parameter], cfg: GDUFConfig) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        if backends.has_bitsandbytes():
            if any(p.device.type != "cuda" for p in params):
                raise ValueError("optimizer='adamw8bit' (bitsandbytes AdamW8bit) runs on CUDA only; these "
                                 "parameters are on the CPU: use optimizer='adamw'")
            if any(is_dtensor(p) for p in params):
                # bitsandbytes allocates its 8-bit state with zeros_like(p) and hands p to its CUDA
                # kernels: FSDP2's DTensor parameters break both (bitsandbytes issues #89, #1633).
                raise ValueError("optimizer='adamw8bit' (bitsandbytes) does not support FSDP2-sharded "
                                 "(DTensor) parameters: use optimizer='adamw' with sharding, or train "
                                 "unsharded with adamw8bit")
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, **kw)
        log.warning("bitsandbytes is not installed; using torch AdamW instead of AdamW8bit")
    elif cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or adamw8bit)")
    return torch.optim.AdamW(params, **kw)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """lr multiplier at optimizer step ``step`` (0-based): ``step / warmup_steps`` during the
    warm-up, then 1 — transformers' ``get_constant_schedule_with_warmup``, which the released
    scripts use (so their first step runs at lr 0)."""
    return step / warmup_steps if step < warmup_steps else 1.0


def _scheduler(opt: torch.optim.Optimizer, cfg: GDUFConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_factor(step, cfg.warmup_steps))


def _train_state(model, opt, sched, ema, generator) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "sched": sched.state_dict(), "rng": generator.get_state()}
    if ema is not None:
        state["ema"] = ema.shadow
    return state


def _resume(run: RunOptions, ctx: DistContext, model, opt, sched, ema, generator) -> int:
    found = adist.latest_checkpoint(run.checkpoint_dir) if run.resume else None
    if found is None:
        return 0
    from torch.distributed.checkpoint.state_dict import set_state_dict
    path, meta = found
    state = _train_state(model, opt, sched, ema, generator)
    adist.load_checkpoint(path, state, ctx)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["sched"])
    generator.set_state(state["rng"])
    log.info("resumed from %s (step %d)", path, meta["step"])
    return int(meta["step"])


def _save(run: RunOptions, ctx: DistContext, step: int, stage: str, model, opt, sched, ema, generator) -> None:
    meta = {"stage": stage, "data": run.data_state() if run.data_state else None}
    path = adist.save_checkpoint(run.checkpoint_dir, step, _train_state(model, opt, sched, ema, generator), meta, ctx)
    log.info("checkpoint %s", path)


def _run(model: UniGenDet, batches: Iterable, cfg: GDUFConfig, step_losses: Callable,
         log_fn: Optional[Callable[[int, dict], None]], run: Optional[RunOptions] = None,
         stage: str = "gduf") -> tuple[list[dict[str, float]], Optional[EMA]]:
    run = run or RunOptions()
    ctx = run.ctx or adist.single(model.device)
    if ctx.distributed and not is_sharded(model):
        raise ValueError("a distributed run needs the model from build_sharded (FSDP2), got a plain module")
    for n, p in model.named_parameters():
        if n.startswith(STAGE_UNUSED[stage]):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if is_sharded(model):
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):   # a parameter unused on one rank still joins the reduce-scatter
                m.set_reduce_scatter_unused_params(True)
    opt = _optimizer(params, cfg)
    sched = _scheduler(opt, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    step = _resume(run, ctx, model, opt, sched, ema, gen) if run.checkpoint_dir else 0
    history = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    for batch in batches:
        if step >= cfg.steps:
            break
        with autocast:
            losses = step_losses(batch, gen)
        # Each rank's loss is its share of the global mean; the sum over ranks is what is logged.
        names = list(losses)
        summed = adist.all_reduce_sum(torch.stack([losses[k].detach().float() for k in names]), ctx)
        report = dict(zip(names, summed))
        if not torch.isfinite(report["loss"]):
            raise FloatingPointError(f"step {step}: non-finite loss {report['loss'].item()} ({_floats(report)})")
        opt.zero_grad(set_to_none=True)
        # FSDP averages gradients over the world; the shares must be summed, so scale back up.
        (losses["loss"] * ctx.world_size if ctx.distributed else losses["loss"]).backward()
        # The global gradient norm (logged; clipped when grad_clip is set): inf leaves the grads as they are.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        history.append({**_floats(report), "grad_norm": float(full_tensor(grad_norm)), "lr": lr})
        if log_fn is not None:
            log_fn(step, history[-1])
        step += 1
        if run.checkpoint_dir and run.checkpoint_every and step % run.checkpoint_every == 0:
            _save(run, ctx, step, stage, model, opt, sched, ema, gen)
    if run.checkpoint_dir and run.checkpoint_every and step % run.checkpoint_every and history:
        _save(run, ctx, step, stage, model, opt, sched, ema, gen)
    return history, ema


def _floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}
