"""UniGenDet's two training stages: GDUF (joint detection/explanation/generation) and DIGA.

GDUF: ``L = λ_det·L_det + λ_exp·L_exp + λ_fm·L_fm`` on batches holding detection and generation
samples 1:1, packed into one sequence (BAGEL's way). L_det is the 2-logit head's CE (a BCE on
the logit difference), L_exp next-token CE on the answer, L_fm the rectified-flow MSE
(``aigid.models.unigendet.flow``). Paper defaults: all λ = 1, AdamW lr 1e-4, wd 1e-2. The released code's
values are ``GDUFConfig.code_preset()``: λ_det 0.2, lr 2e-5, betas (0.9, 0.95), eps 1e-15,
grad clip 1.0, EMA 0.99.

DIGA: the stage-1 model is deep-copied into a frozen teacher. For each ground-truth image the
teacher's detection pass gives layer-ℓ states at the ViT tokens, final-normed (``norm``), resized
bilinearly from the ViT grid to the latent token grid; the student's generation pass gives the
raw layer-ℓ output at the noisy VAE tokens → ``diga_mlp``; ``L = L_flow + λ·mean(1 − cos)``
(λ = 0.5, ℓ = 8 → index 7). Only the generation side trains: every ``*_moe_gen`` parameter
(expert projections, norms, MLPs, ``norm_moe_gen``) plus ``diga_mlp``, ``vae2llm``, ``llm2vae``
and ``time_embedder``; the understanding expert, SigLIP, connector, embeddings, ``lm_head`` and
``fake_cls_head`` stay fixed, so the detector the teacher embodies is not disturbed. The layer
is clamped for small models: ``index = min(layer, num_layers) − 1``.
Unlike the released loop (which swallowed every exception per step and so never applied
DIGA's loss), errors here propagate.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aigid import backends
from aigid.models.unigendet import flow
from aigid.models.unigendet import GenInputs, UniGenDet, detection_loss, patchify_latents

__all__ = ["DetectionItem", "GenerationItem", "GDUFConfig", "DIGAConfig", "gduf_losses", "train_gduf",
           "make_teacher", "diga_layer_index", "diga_trainable_names", "teacher_targets", "diga_alignment",
           "diga_losses", "train_diga", "detection_batch", "generation_batch",
           "EMA"]


@dataclass
class DetectionItem:
    pixels: torch.Tensor                  # (3, S, S) normalised with config.preprocess
    label: int                            # aigid convention: 1 = fake, 0 = real
    explanation: str = ""
    latents: Optional[torch.Tensor] = None  # (C, h, w) scaled VAE latents; encoded when None


@dataclass
class GenerationItem:
    prompt: str
    pixels: Optional[torch.Tensor] = None   # (3, S, S) normalised; DIGA's teacher needs them
    latents: Optional[torch.Tensor] = None  # (C, h, w); encoded from pixels when None


@dataclass
class GDUFConfig:
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lambda_det: float = 1.0
    lambda_exp: float = 1.0
    lambda_fm: float = 1.0
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None      # EMA of the weights (code: 0.99), None = off
    text_dropout: float = 0.1              # prompts dropped for CFG (BAGEL's text_cond_dropout_prob)
    timestep_shift: float = 1.0
    optimizer: str = "adamw"               # "adamw" or "adamw8bit" (bitsandbytes, when installed)
    gradient_checkpointing: bool = False
    seed: int = 0

    @classmethod
    def code_preset(cls, **overrides) -> "GDUFConfig":
        """The released training script's values (paper's loss weights except λ_det = 0.2)."""
        base = cls(lr=2e-5, betas=(0.9, 0.95), eps=1e-15, grad_clip=1.0, ema_decay=0.99, lambda_det=0.2)
        return replace(base, **overrides)


@dataclass
class DIGAConfig(GDUFConfig):
    lam: float = 0.5
    layer: int = 8                         # 1-based decoder layer (the code's index 7)

    @classmethod
    def code_preset(cls, **overrides) -> "DIGAConfig":
        base = cls(lr=2e-5, betas=(0.9, 0.95), eps=1e-15, grad_clip=1.0, ema_decay=0.95)
        return replace(base, **overrides)


# ---- batches --------------------------------------------------------------------------------
def _latents(model: UniGenDet, items) -> torch.Tensor:
    if all(it.latents is not None for it in items):
        return torch.stack([it.latents for it in items]).to(model.device)
    if any(it.pixels is None for it in items):
        raise ValueError("a generation item needs latents or pixels")
    pixels = torch.stack([it.pixels for it in items]).to(model.device)
    return model.encode_latents(model._resize(pixels, model.config.vae_image_size))


def detection_batch(model: UniGenDet, items: Sequence[DetectionItem]):
    pixels = torch.stack([it.pixels for it in items]).to(model.device)
    lat = _latents(model, items) if all(it.latents is not None for it in items) else None
    det = model.detection_inputs(pixels, latents=lat, answers=[it.explanation for it in items])
    labels = torch.tensor([int(it.label) for it in items], device=model.device)
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"detection labels must be 0 (real) or 1 (fake), got {labels.tolist()}")
    return det, labels


def generation_batch(model: UniGenDet, items: Sequence[GenerationItem], shift: float,
                     text_dropout: float, generator: torch.Generator):
    """Noisy latents at sigmoid(randn)-shifted t, the clean latents and the noise (all seeded)."""
    x0 = _latents(model, items)
    tokens = patchify_latents(x0, model.config.latent_patch_size)
    n = tokens.shape[0]
    t = flow.sample_timesteps(n, shift, generator=generator).to(model.device)
    noise = torch.randn(tokens.shape, generator=generator).to(model.device, tokens.dtype)
    drop = torch.rand(n, generator=generator) < text_dropout
    prompts = [None if d else model.tokenizer.encode(it.prompt) for it, d in zip(items, drop.tolist())]
    x_t = flow.interpolate(tokens, noise, t)
    return GenInputs(prompts, x_t, t, model.latent_grid(x0.shape[-2:])), tokens, noise, x0


# ---- GDUF -----------------------------------------------------------------------------------
def gduf_losses(model: UniGenDet, det_items: Sequence[DetectionItem], gen_items: Sequence[GenerationItem],
                cfg: GDUFConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One packed forward over detection + generation samples; weighted total in ``loss``."""
    if len(det_items) != len(gen_items) or not det_items:
        raise ValueError(f"GDUF batches hold detection and generation samples 1:1, got "
                         f"{len(det_items)} and {len(gen_items)}")
    det, labels = detection_batch(model, det_items)
    gen, x0_tok, noise, _ = generation_batch(model, gen_items, cfg.timestep_shift, cfg.text_dropout, generator)
    out = model(det=det, gen=gen)
    l_det = detection_loss(out.cls_logits, labels)
    l_exp = F.cross_entropy(out.answer_logits.float(), out.answer_labels)
    l_fm = flow.flow_loss(out.velocity, x0_tok, noise)
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
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, **kw)
        print("aigid: bitsandbytes is not installed; using torch AdamW instead of AdamW8bit", file=sys.stderr)
    elif cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or adamw8bit)")
    return torch.optim.AdamW(params, **kw)


def _run(model: UniGenDet, batches: Iterable, cfg: GDUFConfig, step_losses: Callable,
         log: Optional[Callable[[int, dict], None]]) -> tuple[list[dict[str, float]], Optional[EMA]]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = _optimizer(params, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    for step, batch in enumerate(batches):
        if step >= cfg.steps:
            break
        with autocast:
            losses = step_losses(batch, gen)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: non-finite loss {loss.item()} ({_floats(losses)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        history.append(_floats(losses))
        if log is not None:
            log(step, history[-1])
    return history, ema


def _floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


def train_gduf(model: UniGenDet, batches: Iterable[tuple[Sequence[DetectionItem], Sequence[GenerationItem]]],
               cfg: Optional[GDUFConfig] = None, log: Optional[Callable[[int, dict], None]] = None,
               ) -> tuple[list[dict[str, float]], Optional[EMA]]:
    """Stage 1, full fine-tuning. ``batches`` yields (detection items, generation items), 1:1.

    Returns the per-step losses and the EMA (when ``ema_decay`` is set; ``ema.copy_to(model)``).
    """
    cfg = cfg or GDUFConfig()
    return _run(model, batches, cfg, lambda b, g: gduf_losses(model, b[0], b[1], cfg, g), log)


# ---- DIGA -----------------------------------------------------------------------------------
def diga_layer_index(layer: int, num_layers: int) -> int:
    """1-based layer ℓ → 0-based index ``min(ℓ, num_layers) − 1`` (7 for BAGEL-7B's ℓ = 8)."""
    if layer < 1:
        raise ValueError(f"DIGA layer is 1-based, got {layer}")
    return min(layer, num_layers) - 1


def make_teacher(model: UniGenDet) -> UniGenDet:
    """A frozen deep copy (eval mode, no grads) of the stage-1 model; shares the external VAE."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


DIGA_HEADS = ("diga_mlp.", "vae2llm.", "llm2vae.", "time_embedder.")


def diga_trainable_names(model: UniGenDet) -> list[str]:
    return [n for n, p in model.named_parameters()
            if ("_moe_gen" in n or n.startswith(DIGA_HEADS)) and not n.endswith("pos_embed")]


def _set_diga_trainable(model: UniGenDet) -> None:
    names = set(diga_trainable_names(model))
    if not any("_moe_gen" in n for n in names):
        raise ValueError("DIGA found no generation-expert (*_moe_gen) parameters in this model")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def teacher_targets(teacher: UniGenDet, pixels: torch.Tensor, latents: torch.Tensor, index: int,
                    grid: tuple[int, int]) -> torch.Tensor:
    """(N, h·w, H): the teacher's final-normed layer-``index`` ViT states, resized to ``grid``."""
    with torch.no_grad():
        out = teacher(det=teacher.detection_inputs(pixels, latents=latents), return_layers=(index,))
        states = teacher.language_model.model.norm(out.layer_outputs[index][out.vit_index])  # (N, n_vit, H)
        n, _, h = states.shape
        gh, gw = out.vit_grid
        maps = states.float().transpose(1, 2).reshape(n, h, gh, gw)
        maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
        return maps.flatten(2).transpose(1, 2)


def diga_alignment(student: UniGenDet, out, index: int, target: torch.Tensor) -> torch.Tensor:
    """mean(1 − cos(diga_mlp(raw layer-``index`` output at the noisy VAE tokens), target))."""
    proj = student.diga_mlp(out.layer_outputs[index][out.gen_vae_index])
    if proj.shape != target.shape:
        raise ValueError(f"DIGA: student features {tuple(proj.shape)} vs teacher targets {tuple(target.shape)}")
    return (1 - F.cosine_similarity(proj.float(), target.float(), dim=-1)).mean()


def diga_losses(student: UniGenDet, teacher: UniGenDet, items: Sequence[GenerationItem], cfg: DIGAConfig,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    if any(it.pixels is None for it in items):
        raise ValueError("DIGA needs the ground-truth pixels of every generation item (the teacher's input)")
    index = diga_layer_index(cfg.layer, len(student.language_model.model.layers))
    gen, x0_tok, noise, x0 = generation_batch(student, items, cfg.timestep_shift, cfg.text_dropout, generator)
    pixels = torch.stack([it.pixels for it in items]).to(student.device)
    target = teacher_targets(teacher, pixels, x0, index, gen.grid)
    out = student(gen=gen, return_layers=(index,))
    l_fm = flow.flow_loss(out.velocity, x0_tok, noise)
    l_diga = diga_alignment(student, out, index, target)
    return {"loss": l_fm + cfg.lam * l_diga, "fm": l_fm.detach(), "diga": l_diga.detach()}


def train_diga(model: UniGenDet, batches: Iterable[Sequence[GenerationItem]], cfg: Optional[DIGAConfig] = None,
               log: Optional[Callable[[int, dict], None]] = None, teacher: Optional[UniGenDet] = None,
               ) -> tuple[UniGenDet, list[dict[str, float]], Optional[EMA]]:
    """Stage 2 on ``model`` (the student, trained in place); returns (teacher, history, ema)."""
    cfg = cfg or DIGAConfig()
    teacher = teacher or make_teacher(model)
    _set_diga_trainable(model)
    history, ema = _run(model, batches, cfg, lambda b, g: diga_losses(model, teacher, b, cfg, g), log)
    return teacher, history, ema
