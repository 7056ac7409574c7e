"""UniGenDet's first training stage, GDUF (joint detection/explanation/generation), and what both
stages share: the items, the configs (:class:`GDUFConfig`, :class:`DIGAConfig`), the batches, the
optimisation loop, checkpoints. The second stage, DIGA (its teacher, alignment loss and
``train_diga``), is :mod:`aigid.training.unigendet.diga`.

GDUF: ``L = λ_det·L_det + λ_exp·L_exp + λ_fm·L_fm`` on batches of detection and generation
samples packed into one sequence (BAGEL's way). L_det is the 2-logit head's CE (a BCE on the
logit difference), L_exp next-token CE on the answer, L_fm the rectified-flow MSE
(``aigid.models.unigendet.flow``). Paper defaults (``GDUFConfig()``): all λ = 1, AdamW lr 1e-4,
wd 1e-2, constant lr, batches holding detection and generation samples 1:1. The released
scripts' values are ``GDUFConfig.code_preset()``; where paper and code differ the preset follows
the code (``train/pretrain_unified_navit_gduf.py``, ``scripts/train/train_GDUF.sh``,
``data/configs/unigendet_GDUF.yaml`` upstream): λ_det 0.2 (``label_weight``), AdamW with
``weight_decay=0`` hard-coded, lr 2e-5, betas (0.9, 0.95), eps 1e-15, grad clip 1.0, EMA 0.99,
2,000 linear warm-up steps then a constant lr, and the data mixed by weight — every sample's
source drawn at random, FakeClue (detection/explanation) 5 : t2i (generation) 1
(:func:`mixed_batches`).

Distributed (``torchrun``, :mod:`aigid.training.dist`): :func:`build_sharded` builds the model on the meta
device, ``fully_shard``s every MoT decoder layer and SigLIP encoder layer and then the root on the
``(replicate, shard)`` mesh (hybrid sharding; bf16 compute with fp32 gradient reduction on CUDA),
and loads the weights read by rank 0. Both trainers (:func:`train_gduf` here, ``train_diga`` in
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
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aigid import backends
from aigid.training import dist as adist
from aigid.training.dist import DistContext
from aigid.models.unigendet import DetInputs, GenInputs, UniGenDet, flow, patchify_latents
from aigid.models.unigendet.model import fake_label_to_class
from aigid.training.unigendet.shard import (build_sharded, build_teacher, export_pretrained,  # noqa: F401
                                         full_tensor, is_dtensor, is_sharded, shard_unigendet)

__all__ = ["DetectionItem", "GenerationItem", "GDUFConfig", "DIGAConfig", "gduf_losses", "train_gduf",
           "mixed_batches", "warmup_factor", "detection_batch", "generation_batch", "EMA", "RunOptions",
           "shard_unigendet", "build_sharded", "build_teacher", "export_pretrained", "is_sharded"]

log = logging.getLogger(__name__)


@dataclass
class DetectionItem:
    pixels: torch.Tensor                  # (3, H, W): the VAE image as model.preprocess gives it, any size
    label: int                            # aigid convention: 1 = fake, 0 = real
    explanation: str = ""
    latents: Optional[torch.Tensor] = None  # (C, H/8, W/8) scaled VAE latents; encoded when None


@dataclass
class GenerationItem:
    prompt: str
    pixels: Optional[torch.Tensor] = None   # (3, H, W) as model.preprocess gives it; DIGA's teacher needs them
    latents: Optional[torch.Tensor] = None  # (C, h, w); encoded from pixels when None


MIXES = ("paired", "weighted")


@dataclass
class GDUFConfig:
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0                  # linear warm-up from 0, then constant (code: 2000)
    lambda_det: float = 1.0
    lambda_exp: float = 1.0
    lambda_fm: float = 1.0
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None      # EMA of the weights (code: 0.99), None = off
    text_dropout: float = 0.1              # prompts dropped for CFG (BAGEL's text_cond_dropout_prob)
    timestep_shift: float = 1.0
    # Data mix (mixed_batches): "paired" = n detection + n generation samples per batch (the
    # paper preset); "weighted" = each sample's source drawn by det_weight : gen_weight (code: 5 : 1).
    mix: str = "paired"
    det_weight: float = 1.0
    gen_weight: float = 1.0
    optimizer: str = "adamw"               # "adamw" or "adamw8bit" (bitsandbytes, when installed)
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.det_weight < 0 or self.gen_weight < 0 or self.det_weight + self.gen_weight <= 0:
            raise ValueError(f"data weights must be >= 0 with a positive sum, got "
                             f"{self.det_weight} : {self.gen_weight}")
        if self.mix == "paired" and self.det_weight != self.gen_weight:
            raise ValueError("det_weight/gen_weight other than 1:1 need mix='weighted'")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    @classmethod
    def code_preset(cls, **overrides) -> "GDUFConfig":
        """The released GDUF script (``train/pretrain_unified_navit_gduf.py`` with
        ``scripts/train/train_GDUF.sh`` and ``data/configs/unigendet_GDUF.yaml``): AdamW with
        weight_decay 0 (hard-coded there; the paper says 1e-2), lr 2e-5, betas (0.9, 0.95), eps
        1e-15, clip 1.0, EMA 0.99, λ_det 0.2 (``label_weight``), warm-up 2,000 steps then constant
        (``lr_scheduler="constant"``), sources drawn by weight FakeClue 5 : t2i 1."""
        base = cls(lr=2e-5, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-15, grad_clip=1.0, ema_decay=0.99,
                   lambda_det=0.2, warmup_steps=2000, mix="weighted", det_weight=5.0, gen_weight=1.0)
        return replace(base, **overrides)


TEACHER_PROMPTS = ("default", "code")


@dataclass
class DIGAConfig(GDUFConfig):
    lam: float = 0.5
    layer: int = 8                         # 1-based decoder layer (the code's index 7)
    teacher_prompt: str = "default"        # "default" or "code" (see train_unigendet_diga.teacher_inputs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_prompt not in TEACHER_PROMPTS:
            raise ValueError(f"teacher_prompt must be one of {TEACHER_PROMPTS}, got {self.teacher_prompt!r}")

    @classmethod
    def code_preset(cls, **overrides) -> "DIGAConfig":
        """The released DIGA script (``train/pretrain_unified_navit_diga.py`` with
        ``scripts/train/train_DIGA.sh``): weight_decay 0 (hard-coded), lr 2e-5, betas (0.9, 0.95),
        eps 1e-15, clip 1.0, EMA 0.95, warm-up 2,000 steps (the file's default; the script sets
        none) then constant, λ_DIGA 0.5, and the teacher's forensic prompt (``teacher_prompt="code"``).
        Its data is t2i only (``data/configs/unigendet_DIGA.yaml``)."""
        base = cls(lr=2e-5, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-15, grad_clip=1.0, ema_decay=0.95,
                   warmup_steps=2000, teacher_prompt="code")
        return replace(base, **overrides)


# ---- data mix -------------------------------------------------------------------------------
def mixed_batches(det_source: Iterable[DetectionItem], gen_source: Iterable[GenerationItem], batch_size: int,
                  cfg: GDUFConfig) -> Iterator[tuple[list[DetectionItem], list[GenerationItem]]]:
    """(detection items, generation items) batches of ``batch_size`` samples for ``train_gduf``.

    ``cfg.mix == "paired"``: ``batch_size / 2`` of each (the paper preset). ``"weighted"``: as
    the released ``PackedDataset.__iter__`` (``data/dataset_base.py``), each batch opens with one
    sample of every source of positive weight (both groups are ``is_mandatory`` in
    ``unigendet_GDUF.yaml``), then each further sample's source is drawn at random with
    probability ∝ ``det_weight`` : ``gen_weight`` (``random.Random(cfg.seed)``, so reproducible).
    Upstream fills packs up to a token budget; here a batch is a sample count. Stops when a
    source it needs is exhausted (wrap sources in ``itertools.cycle`` for epochs)."""
    det_it, gen_it = iter(det_source), iter(gen_source)
    if cfg.mix == "paired":
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"paired batches need an even batch_size >= 2, got {batch_size}")
        half = batch_size // 2
        while True:
            det, gen = _take(det_it, half), _take(gen_it, half)
            if det is None or gen is None:
                return
            yield det, gen
    p_det = cfg.det_weight / (cfg.det_weight + cfg.gen_weight)
    opening = [kind for kind, w in (("det", cfg.det_weight), ("gen", cfg.gen_weight)) if w > 0]
    if batch_size < len(opening):
        raise ValueError(f"weighted batches open with one sample of each source: batch_size must be "
                         f">= {len(opening)}, got {batch_size}")
    rng = random.Random(cfg.seed)
    while True:
        kinds = opening + ["det" if rng.random() < p_det else "gen" for _ in range(batch_size - len(opening))]
        det = _take(det_it, kinds.count("det"))
        gen = _take(gen_it, kinds.count("gen"))
        if det is None or gen is None:
            return
        yield det, gen


def _take(it: Iterator, n: int) -> Optional[list]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            return None
    return out


# ---- batches --------------------------------------------------------------------------------
def _draw_seed(generator: Optional[torch.Generator]) -> Optional[int]:
    """A seed for the VAE posterior sample, drawn from the run's generator (fresh each batch)."""
    return None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@dataclass(frozen=True)
class _Part:
    """This rank's run of one kind of item inside the global batch (the ranks' items in rank
    order): its first index and the global count, and the same for the items whose latents are
    encoded (one posterior seed each). Every rank draws the global batch's random numbers and keeps
    its slice, so N ranks draw exactly what one process would for the concatenated batch."""
    offset: int
    total: int
    miss_offset: int
    miss_total: int

    @classmethod
    def local(cls, items) -> "_Part":
        return cls(0, len(items), 0, sum(it.latents is None for it in items))

    def take(self, drawn: torch.Tensor, n: int) -> torch.Tensor:
        return drawn[self.offset:self.offset + n]


def _item_latents(model: UniGenDet, items, generator: Optional[torch.Generator],
                  part: Optional[_Part] = None) -> list[torch.Tensor]:
    """Each item's latents: given, or encoded from its pixels (sampled posterior, as BAGEL)."""
    part = part or _Part.local(items)
    missing = [i for i, it in enumerate(items) if it.latents is None]
    if any(items[i].pixels is None for i in missing):
        raise ValueError("an item needs latents or pixels")
    seeds = [_draw_seed(generator) for _ in range(part.miss_total)][part.miss_offset:part.miss_offset + len(missing)]
    out = [None if it.latents is None else it.latents.to(model.device) for it in items]
    if missing:
        encoded = model.encode_latents([items[i].pixels.to(model.device) for i in missing], seed=seeds)
        for i, z in zip(missing, encoded):
            out[i] = z
    return out


def detection_batch(model: UniGenDet, items: Sequence[DetectionItem],
                    generator: Optional[torch.Generator] = None, *, part: Optional[_Part] = None,
                    vit_pixels: Optional[list[torch.Tensor]] = None) -> tuple[DetInputs, torch.Tensor]:
    """Detection inputs and labels; the images may differ in size (each keeps its token grid)."""
    labels = torch.tensor([int(it.label) for it in items], device=model.device)
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"detection labels must be 0 (real) or 1 (fake), got {labels.tolist()}")
    pixels = [it.pixels.to(model.device) for it in items]
    det = model.detection_inputs(pixels, vit_pixels=vit_pixels, latents=_item_latents(model, items, generator, part),
                                 answers=[it.explanation for it in items])
    return det, labels


def _generation_latents(model: UniGenDet, items: Sequence[GenerationItem],
                        generator: Optional[torch.Generator], part: Optional[_Part] = None) -> torch.Tensor:
    """(N, C, h, w): one latent grid per generation batch (``GenInputs.grid``), so sizes must match."""
    lat = _item_latents(model, items, generator, part)
    shapes = sorted({tuple(z.shape) for z in lat})
    if len(shapes) > 1:
        raise ValueError(f"generation items in one batch must share a size (one latent grid per batch); "
                         f"got latents of shapes {shapes}: batch them by size")
    return torch.stack(lat)


def generation_batch(model: UniGenDet, items: Sequence[GenerationItem], shift: float,
                     text_dropout: float, generator: torch.Generator, *, part: Optional[_Part] = None):
    """Noisy latents at sigmoid(randn)-shifted t, the clean latent tokens, the noise and the clean
    latents (all seeded). The items must share one size. ``part``: this rank's slice of the global
    batch, whose random numbers are drawn in full (see :class:`_Part`)."""
    part = part or _Part.local(items)
    x0 = _generation_latents(model, items, generator, part)
    tokens = patchify_latents(x0, model.config.latent_patch_size)
    n = tokens.shape[0]
    t = part.take(flow.sample_timesteps(part.total, shift, generator=generator), n).to(model.device)
    noise = part.take(torch.randn((part.total,) + tuple(tokens.shape[1:]), generator=generator), n)
    noise = noise.to(model.device, tokens.dtype)
    drop = part.take(torch.rand(part.total, generator=generator), n) < text_dropout
    prompts = [None if d else model.tokenizer.encode(it.prompt) for it, d in zip(items, drop.tolist())]
    x_t = flow.interpolate(tokens, noise, t)
    return GenInputs(prompts, x_t, t, model.latent_grid(x0.shape[-2:])), tokens, noise, x0


# ---- the global batch across ranks ----------------------------------------------------------
def _vit_calls(model: UniGenDet, pixels: Sequence[torch.Tensor]) -> int:
    """SigLIP runs once per distinct image size: with per-layer sharding every rank must run it as
    often as every other (each run all-gathers the layers' weights)."""
    return len({tuple(model.vit_image(p.to(model.device)).shape) for p in pixels})


def _gen_tokens(model: UniGenDet, items: Sequence[GenerationItem]) -> int:
    """Latent tokens per generation sample (the first item's grid; one grid per batch is checked later)."""
    if not items:
        return 0
    it, p = items[0], model.config.latent_patch_size
    h, w = it.latents.shape[-2:] if it.latents is not None else \
        [s // int(model.config.vae.get("downsample", 8)) for s in it.pixels.shape[-2:]]
    return (h // p) * (w // p)


def _plan(ctx: DistContext, det_items: Sequence, gen_items: Sequence, vit_calls: int,
          gen_tokens: int) -> tuple[_Part, _Part]:
    """Where this rank's detection and generation items sit in the global batch (one all-gather
    of six ints). Ranks must agree on what runs: detection items on all ranks or none, as many
    SigLIP image sizes, generation items on all or none, one latent grid — else every rank raises
    the same error (rather than hanging in a collective)."""
    local = [len(det_items), sum(it.latents is None for it in det_items), vit_calls,
             len(gen_items), sum(it.latents is None for it in gen_items), gen_tokens]
    rows = adist.all_gather_ints(local, ctx)
    for what, col in (("whether they hold detection items", lambda r: r[0] > 0),
                      ("the number of SigLIP image sizes", lambda r: r[2]),
                      ("whether they hold generation items", lambda r: r[3] > 0),
                      ("the generation latent grid (tokens per sample)", lambda r: r[5])):
        if len({col(r) for r in rows}) > 1:
            raise ValueError(f"sharded step: ranks disagree on {what}; per rank [det, det to encode, SigLIP "
                             f"sizes, gen, gen to encode, gen tokens] = {rows}. Give every rank batches of "
                             "the same kinds and bucket images by size.")
    r = ctx.rank
    part = lambda n, m: _Part(sum(x[n] for x in rows[:r]), sum(x[n] for x in rows),  # noqa: E731
                              sum(x[m] for x in rows[:r]), sum(x[m] for x in rows))
    return part(0, 1), part(3, 4)


def _fm_sum(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching squared error summed (``flow.flow_loss`` is this over its element count)."""
    return (pred.float() - flow.velocity_target(x0, noise).float()).pow(2).sum()


def _ratio(total: torch.Tensor, count) -> torch.Tensor:
    return total / count if float(count) > 0 else total * 0.0


# ---- GDUF -----------------------------------------------------------------------------------
def gduf_losses(model: UniGenDet, det_items: Sequence[DetectionItem], gen_items: Sequence[GenerationItem],
                cfg: GDUFConfig, generator: torch.Generator, *, ctx: Optional[DistContext] = None,
                ) -> dict[str, torch.Tensor]:
    """One packed forward over detection + generation samples; weighted total in ``loss``.

    ``mix="paired"`` requires the two 1:1; ``"weighted"`` takes any mix (a batch without one
    kind contributes 0 to that kind's losses). Each loss is this rank's sum over samples (L_det),
    answer tokens (L_exp) or latent elements (L_fm) divided by the count over all ranks of
    ``ctx``; summed over ranks they are the global batch's means (one process: the means)."""
    ctx = ctx or adist.single(model.device)
    if cfg.mix == "paired" and (len(det_items) != len(gen_items) or not det_items):
        raise ValueError(f"GDUF batches hold detection and generation samples 1:1 (mix='paired'), got "
                         f"{len(det_items)} and {len(gen_items)}")
    if not det_items and not gen_items:
        raise ValueError("empty GDUF batch")
    vit = [model.vit_image(it.pixels.to(model.device)) for it in det_items]
    det_part, gen_part = _plan(ctx, det_items, gen_items, len({tuple(v.shape) for v in vit}),
                               _gen_tokens(model, gen_items))
    det, labels = detection_batch(model, det_items, generator, part=det_part, vit_pixels=vit) \
        if det_items else (None, None)
    gen = None
    if gen_items:
        gen, x0_tok, noise, _ = generation_batch(model, gen_items, cfg.timestep_shift, cfg.text_dropout, generator,
                                                 part=gen_part)
    out = model(det=det, gen=gen)
    zero = out.hidden.new_zeros((), dtype=torch.float32)
    has_answers = det is not None and out.answer_logits is not None
    n_answer = adist.all_reduce_sum(torch.tensor(float(out.answer_labels.numel() if has_answers else 0),
                                                 device=zero.device), ctx)
    l_det = _ratio(F.cross_entropy(out.cls_logits.float(), fake_label_to_class(labels), reduction="sum"),
                   det_part.total) if det is not None else zero
    l_exp = _ratio(F.cross_entropy(out.answer_logits.float(), out.answer_labels, reduction="sum"),
                   n_answer) if has_answers else zero
    l_fm = _ratio(_fm_sum(out.velocity, x0_tok, noise), gen_part.total * x0_tok[0].numel()) \
        if gen is not None else zero
    loss = cfg.lambda_det * l_det + cfg.lambda_exp * l_exp + cfg.lambda_fm * l_fm
    return {"loss": loss, "det": l_det.detach(), "exp": l_exp.detach(), "fm": l_fm.detach()}


class EMA:
    """Exponential moving average of the trainable parameters (kept in float32)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, v in self.shadow.items():
            params[n].copy_(v.to(params[n].dtype))


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


@dataclass
class RunOptions:
    """How a stage runs beyond one process's plain loop (every field optional).

    ``ctx``: the torchrun context (:func:`aigid.training.dist.init`); the model must then come from
    :func:`build_sharded`. ``checkpoint_dir`` / ``checkpoint_every``: a DCP checkpoint every that
    many optimizer steps (and after the last); with ``resume`` the newest complete one under
    ``checkpoint_dir`` is loaded first and training continues from its step — the caller reads
    its data position with ``aigid.training.dist.latest_checkpoint(dir)[1]["data"]`` and hands in the
    batches that follow it. ``data_state``: called at each checkpoint, a JSON-able dict saved
    beside it (the data position)."""
    ctx: Optional[DistContext] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    data_state: Optional[Callable[[], dict]] = None
    resume: bool = True


# The stage-unused modules are frozen before the optimizer is built: a parameter no gradient ever
# reaches would have no optimizer state in a checkpoint but a zero state in the skeleton DCP loads
# into (and FSDP would reduce zero gradients for it, so weight decay would move it).
STAGE_UNUSED = {"gduf": ("diga_mlp.", "latent_to_vit_connector."), "diga": ("latent_to_vit_connector.",)}


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


def train_gduf(model: UniGenDet, batches: Iterable[tuple[Sequence[DetectionItem], Sequence[GenerationItem]]],
               cfg: Optional[GDUFConfig] = None, log: Optional[Callable[[int, dict], None]] = None, *,
               run: Optional[RunOptions] = None) -> tuple[list[dict[str, float]], Optional[EMA]]:
    """Stage 1, full fine-tuning. ``batches`` yields (detection items, generation items): build
    them with :func:`mixed_batches` (1:1 for ``mix="paired"``, drawn by weight for ``"weighted"``);
    under torchrun, this rank's share of the global batch.

    Returns the per-step losses (summed over ranks: the global batch's) with the step's ``lr``
    and gradient norm ``grad_norm`` (before clipping), and the EMA (when ``ema_decay`` is set; ``ema.copy_to(model)``). ``run``: distribution and
    checkpoints (:class:`RunOptions`). ``diga_mlp`` and ``latent_to_vit_connector`` (unused in
    this stage) are frozen."""
    cfg = cfg or GDUFConfig()
    ctx = run.ctx if run is not None else None
    return _run(model, batches, cfg, lambda b, g: gduf_losses(model, b[0], b[1], cfg, g, ctx=ctx), log, run, "gduf")


# ---- DIGA: aigid.training.unigendet.diga ----------------------------------------------------------
# Its names still resolve here (``from aigid.training.unigendet.gduf import train_diga``), imported on first
# use (PEP 562): that module imports this one, so nothing of it is imported at load.
_DIGA_NAMES = ("make_teacher", "diga_layer_index", "diga_trainable_names", "DIGA_HEADS", "DIGA_CODE_PROMPT",
               "teacher_inputs", "teacher_targets", "diga_alignment", "diga_losses", "train_diga")


def __getattr__(name: str):
    if name in _DIGA_NAMES:
        from aigid.training.unigendet import diga as train_unigendet_diga
        return getattr(train_unigendet_diga, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
