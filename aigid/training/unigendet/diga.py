"""UniGenDet's second training stage, DIGA; the first (GDUF), its config :class:`DIGAConfig` and
the training loop both stages share live in :mod:`aigid.training.unigendet.gduf`.

DIGA: the stage-1 model is deep-copied into a frozen teacher. For each ground-truth image the
teacher's detection pass gives layer-ℓ states at the ViT tokens, final-normed (``norm``), resized
bilinearly from the ViT grid to the latent token grid; the student's generation pass gives the
raw layer-ℓ output at the noisy VAE tokens → ``diga_mlp``; ``L = L_flow + λ·mean(1 − cos)``
(λ = 0.5, ℓ = 8 → index 7). Only the generation side trains: every ``*_moe_gen`` parameter
(expert projections, norms, MLPs, ``norm_moe_gen``) plus ``diga_mlp``, ``vae2llm``, ``llm2vae``
and ``time_embedder``; the understanding expert, SigLIP, connector, embeddings, ``lm_head`` and
``fake_cls_head`` stay fixed, so the detector the teacher embodies is not disturbed. The layer
is clamped for small models: ``index = min(layer, num_layers) − 1``. The teacher's sequence is
ours by default (``[VAE] [ViT] [question]``) or, with ``teacher_prompt="code"``, the released
code's ``[VAE] [forensic prompt with the caption] [ViT]`` (:func:`teacher_inputs`).
Unlike the released loop (which swallowed every exception per step and so never applied
DIGA's loss), errors here propagate.

Distributed: as GDUF (``run=RunOptions(...)``, :class:`aigid.training.unigendet.common.RunOptions`). DIGA's
teacher is a second model built from the same weights (:func:`aigid.training.unigendet.gduf.build_teacher`),
never a deep copy of a sharded student.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from aigid.models.unigendet import DetInputs, UniGenDet
from aigid.training import dist as adist
from aigid.training.dist import DistContext
from aigid.training.unigendet.common import (EMA, TEACHER_PROMPTS, DIGAConfig, GenerationItem, RunOptions,
                                             _fm_sum, _gen_tokens, _plan, _ratio, _vit_calls,
                                             generation_batch)
from aigid.training.unigendet.loop import _run
from aigid.training.unigendet.shard import is_sharded

__all__ = ["make_teacher", "diga_layer_index", "diga_trainable_names", "DIGA_CODE_PROMPT", "teacher_inputs",
           "teacher_targets", "diga_alignment", "diga_losses", "train_diga"]


def diga_layer_index(layer: int, num_layers: int) -> int:
    """1-based layer ℓ → 0-based index ``min(ℓ, num_layers) − 1`` (7 for BAGEL-7B's ℓ = 8)."""
    if layer < 1:
        raise ValueError(f"DIGA layer is 1-based, got {layer}")
    return min(layer, num_layers) - 1


def make_teacher(model: UniGenDet) -> UniGenDet:
    """A frozen deep copy (eval mode, no grads) of the stage-1 model; shares the external VAE.
    One process only: a sharded model's teacher comes from :func:`build_teacher`."""
    if is_sharded(model):
        raise ValueError("a sharded (FSDP2) model cannot be deep-copied into DIGA's teacher: build it from "
                         "the same weights with build_teacher(source, ctx) and pass teacher=")
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


# The released teacher's text (modeling/bagel/bagel_generation_diga.py, verbatim as data: a
# triple-quoted f-string, so its continuation lines keep the source's 24-space indent).
_INDENT = "\n" + " " * 24
DIGA_CODE_PROMPT = (
    'Act as a forensic image analyst. The image was generated for the prompt: "{caption}".'
    + _INDENT + "Briefly and professionally state the specific visual evidence that supports the image's "
    "authenticity."
    + _INDENT + "For each point, concisely link it to a prompt element "
    "(e.g., \u201c<element>: <visual evidence>\u201d)."
    + _INDENT + "Use very brief, factual language and limit the output to only the most critical 2-3 points.")


def teacher_inputs(teacher: UniGenDet, pixels, latents, *, prompts: Optional[Sequence[str]] = None,
                   teacher_prompt: str = "default") -> DetInputs:
    """The teacher's detection sequence over the ground-truth images.

    ``"default"``: our detection layout, ``[VAE] [ViT] [question] <|im_start|>``.
    ``"code"``: the released DIGA forward's (``modeling/bagel/bagel_generation_diga.py``):
    ``[VAE] <|im_start|> DIGA_CODE_PROMPT with the image's caption <|im_end|> [ViT]`` and no
    question (here ``mid_ids`` and ``question_ids = None``). Our pack still ends with the
    ``<|im_start|>`` the detection head reads; it follows the ViT split, so no ViT token sees it
    and the targets are those of the released sequence. In the released run this loss never
    reached the weights (its loop read a key the forward never returned, inside a blanket
    ``except``); here it does."""
    det = teacher.detection_inputs(pixels, latents=latents)
    if teacher_prompt == "default":
        return det
    if teacher_prompt != "code":
        raise ValueError(f"teacher_prompt must be one of {TEACHER_PROMPTS}, got {teacher_prompt!r}")
    if prompts is None or len(prompts) != len(det):
        raise ValueError("teacher_prompt='code' needs one caption per image")
    mid = [teacher.tokenizer.encode(DIGA_CODE_PROMPT.format(caption=p)) for p in prompts]
    return replace(det, mid_ids=mid, question_ids=[None] * len(det))


def teacher_targets(teacher: UniGenDet, pixels, latents, index: int, grid: tuple[int, int], *,
                    prompts: Optional[Sequence[str]] = None, teacher_prompt: str = "default") -> torch.Tensor:
    """(N, h·w, H): the teacher's final-normed layer-``index`` ViT states, each image's ViT grid
    resized bilinearly to the latent token ``grid`` (images may differ in size; the released code
    also resizes per image)."""
    with torch.no_grad():
        det = teacher_inputs(teacher, pixels, latents, prompts=prompts, teacher_prompt=teacher_prompt)
        out = teacher(det=det, return_layers=(index,))
        states = out.layer_outputs[index]
        if isinstance(out.vit_grid, tuple):    # all images the same size
            per_image = [(pos, out.vit_grid) for pos in out.vit_index]
        else:
            per_image = list(zip(out.vit_index, out.vit_grid))
        norm, targets = teacher.language_model.model.norm, []
        if is_sharded(teacher):     # the final norm is read outside the forward: gather the root's shards
            teacher.unshard()
        for pos, (gh, gw) in per_image:
            s = norm(states[pos]).float()                                   # (gh·gw, H)
            m = s.transpose(0, 1).reshape(1, s.shape[1], gh, gw)
            m = F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False)
            targets.append(m[0].flatten(1).transpose(0, 1))                 # (h·w, H)
        if is_sharded(teacher):
            teacher.reshard()
        return torch.stack(targets)


def diga_alignment(student: UniGenDet, out, index: int, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """mean (or ``reduction="sum"``) of 1 − cos(diga_mlp(raw layer-``index`` output at the noisy
    VAE tokens), target) over the latent tokens."""
    proj = student.diga_mlp(out.layer_outputs[index][out.gen_vae_index])
    if proj.shape != target.shape:
        raise ValueError(f"DIGA: student features {tuple(proj.shape)} vs teacher targets {tuple(target.shape)}")
    dist = 1 - F.cosine_similarity(proj.float(), target.float(), dim=-1)
    return dist.sum() if reduction == "sum" else dist.mean()


def diga_losses(student: UniGenDet, teacher: UniGenDet, items: Sequence[GenerationItem], cfg: DIGAConfig,
                generator: torch.Generator, *, ctx: Optional[DistContext] = None) -> dict[str, torch.Tensor]:
    """L_flow + λ·L_DIGA on this rank's items; both are sums over this rank's latent elements /
    tokens divided by the counts over all ranks of ``ctx`` (one process: the means)."""
    ctx = ctx or adist.single(student.device)
    if any(it.pixels is None for it in items):
        raise ValueError("DIGA needs the ground-truth pixels of every generation item (the teacher's input)")
    index = diga_layer_index(cfg.layer, len(student.language_model.model.layers))
    _, part = _plan(ctx, [], items, _vit_calls(teacher, [it.pixels for it in items]), _gen_tokens(student, items))
    gen, x0_tok, noise, x0 = generation_batch(student, items, cfg.timestep_shift, cfg.text_dropout, generator,
                                              part=part)
    pixels = [it.pixels.to(student.device) for it in items]
    # The teacher reads the caption even where the student's prompt was dropped for CFG (as released).
    target = teacher_targets(teacher, pixels, x0, index, gen.grid, prompts=[it.prompt for it in items],
                             teacher_prompt=cfg.teacher_prompt)
    out = student(gen=gen, return_layers=(index,))
    l_fm = _ratio(_fm_sum(out.velocity, x0_tok, noise), part.total * x0_tok[0].numel())
    l_diga = _ratio(diga_alignment(student, out, index, target, reduction="sum"), part.total * x0_tok.shape[1])
    return {"loss": l_fm + cfg.lam * l_diga, "fm": l_fm.detach(), "diga": l_diga.detach()}


def train_diga(model: UniGenDet, batches: Iterable[Sequence[GenerationItem]], cfg: Optional[DIGAConfig] = None,
               log: Optional[Callable[[int, dict], None]] = None, teacher: Optional[UniGenDet] = None, *,
               run: Optional[RunOptions] = None) -> tuple[UniGenDet, list[dict[str, float]], Optional[EMA]]:
    """Stage 2 on ``model`` (the student, trained in place); returns (teacher, history, ema).
    Each batch's items must share one image size (one latent grid). A sharded student needs
    ``teacher=build_teacher(source, ctx)`` (no deep copy of a sharded model)."""
    cfg = cfg or DIGAConfig()
    teacher = teacher or make_teacher(model)
    _set_diga_trainable(model)
    ctx = run.ctx if run is not None else None
    history, ema = _run(model, batches, cfg, lambda b, g: diga_losses(model, teacher, b, cfg, g, ctx=ctx), log,
                        run, "diga")
    return teacher, history, ema
