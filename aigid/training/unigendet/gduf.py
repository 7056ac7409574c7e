"""UniGenDet's first training stage, GDUF (joint detection/explanation/generation). What both stages
share is in :mod:`~aigid.training.unigendet.common` (items, configs, batches) and
:mod:`~aigid.training.unigendet.loop` (optimiser, loop, checkpoints); the second stage, DIGA (its
teacher, alignment loss and ``train_diga``), is :mod:`aigid.training.unigendet.diga`.

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
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from aigid.models.unigendet import DetInputs, UniGenDet
from aigid.models.unigendet.model import fake_label_to_class
from aigid.training import dist as adist
from aigid.training.dist import DistContext
from aigid.training.unigendet.common import (EMA, DetectionItem, GDUFConfig, GenerationItem, RunOptions,
                                             _fm_sum, _gen_tokens, _item_latents, _Part, _plan, _ratio,
                                             generation_batch)
from aigid.training.unigendet.loop import _run

log = logging.getLogger("aigid.training.unigendet")


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
