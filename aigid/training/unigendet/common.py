"""What both UniGenDet training stages share: the items (:class:`DetectionItem`,
:class:`GenerationItem`), the configs (:class:`GDUFConfig`, :class:`DIGAConfig`), :class:`EMA`,
:class:`RunOptions`, and the batch building whose random draws (VAE posterior seeds, timesteps,
noise, CFG drop) are made for the whole global batch on every rank and sliced (:class:`_Part`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from aigid.models.unigendet import GenInputs, UniGenDet, flow, patchify_latents
from aigid.training import dist as adist
from aigid.training.dist import DistContext

log = logging.getLogger("aigid.training.unigendet")


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
