"""UniGenDet (arXiv 2604.21904): BAGEL's MoT fine-tuned to detect, explain and generate.

One packed sequence, one shared attention (``aigid.ops.packed_attention`` inside the MoT):

* detection sample: ``[prefix] <|vision_start|> VAE <|vision_end|> <|vision_start|> ViT
  <|vision_end|> <|im_start|> question <|im_end|> <|im_start|> answer <|im_end|>``; the VAE
  latents are clean (t = 0) and go to the generation expert, the SigLIP tokens to the
  understanding expert. **SMSA** is this layout, as in the public code: every ViT query reads
  K/V of [text prefix; VAE; ViT] in every layer — no extra module, no weights. With the
  ``sdpa`` attention backend (the default without flash-attn) that read is one
  ``ops.smsa_attention`` call on views of the packed buffers (fused Triton kernel on CUDA).
* generation sample: ``<|im_start|> prompt <|im_end|> <|vision_start|> noisy VAE <|vision_end|>``,
  the noisy split hidden from every other split; velocity = ``llm2vae`` of its last hidden.

Image splits keep BAGEL's layout exactly (so released weights behave as trained): the
``<|vision_start|>``/``<|vision_end|>`` markers sit inside their image's split (same RoPE id,
full attention) and, being text, are routed to the understanding expert even in a VAE split.

Heads (key names as the release): ``fake_cls_head`` = LayerNorm → Linear(H, H/4) → ReLU →
Linear(H/4, 2), read at the ``<|im_start|>`` opening the answer. Its class order is the code's:
**index 1 = real, 0 = fake**; aigid's API is P(fake) (label 1 = fake), converted here
(``FAKE_CLASS``, ``fake_label_to_class``). A 2-logit softmax CE is a BCE on the logit difference:
``CE(z, c) = BCE(σ(z_fake − z_real), [c == fake])``. ``diga_mlp`` projects layer-8 generator
states for DIGA; ``latent_to_vit_connector`` exists in the release but no forward path uses it
(kept only so checkpoints load). The flow convention is ``aigid.models.unigendet.flow``'s.

Beside this file: ``modules`` (embedders, connector, heads), ``inputs`` (how samples are
packed), ``release`` (release folders, the VAE), ``sampling`` (next token), ``config``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from aigid.data.bagel_resize import BagelResize
from aigid.data.chunks import prepared_chunks
from aigid.data.transforms import Errors, ImageInput, Prepared, Transform, eval_transform, is_single, prepare
from aigid.errors import MissingHeadError
from aigid.models.calibration import calibrate_scores, stored_threshold
from aigid.models.card import hf_fields, write_model_card
from aigid.models.checkpoint import save_state_dict
from aigid.models.unigendet import flow
from aigid.models.streaming import collect, default_batch_size, stream
from aigid.models.unigendet.config import GENERATION_PRESETS, UniGenDetConfig
from aigid.models.unigendet.decode import parse_verdict
from aigid.models.unigendet.inputs import DetInputs, GenInputs, Generated, Images, PackBuilder, PackOutput
from aigid.models.unigendet.modules import (MLPConnector, PositionEmbedding, TimestepEmbedder,
                                            patchify_latents, sincos_2d, unigendet_heads,
                                            unpatchify_latents)
from aigid.models.unigendet.mot import MoTForCausalLM
from aigid.models.unigendet.loading import CONFIG_FILE, VAE_FILE, WEIGHTS_FILE, load_pretrained
from aigid.models.unigendet.vae import build_vae, has_vae
from aigid.models.unigendet.vae import decode_latents as vae_decode
from aigid.models.unigendet.vae import encode_latents as vae_encode
from aigid.models.unigendet.siglip import SigLIPVisionModel, position_ids
from aigid.models.unigendet.tokenizer import Tokenizer, build_tokenizer
from aigid.ops.packing import PackedLayout

__all__ = ["UniGenDetConfig", "UniGenDet", "DetInputs", "GenInputs", "PackOutput", "Generated",
           "FAKE_CLASS", "REAL_CLASS", "fake_label_to_class", "detection_loss", "patchify_latents",
           "unpatchify_latents", "sincos_2d", "MissingHeadError"]

log = logging.getLogger(__name__)

FAKE_CLASS, REAL_CLASS = 0, 1                      # fake_cls_head's class order (the released code's)


def fake_label_to_class(labels: torch.Tensor) -> torch.Tensor:
    """aigid labels (1 = fake, 0 = real) → fake_cls_head classes (0 = fake, 1 = real)."""
    return 1 - labels.long()


def detection_loss(logits: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
    """Softmax CE of the 2-logit head on aigid labels (1 = fake); equals BCE on z_fake − z_real."""
    return F.cross_entropy(logits.float(), fake_label_to_class(fake_labels))


# ---- the model ------------------------------------------------------------------------------


class UniGenDet(nn.Module):
    def __init__(self, config: UniGenDetConfig, seed: int = 0, vae: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        mot, vit = config.mot(), config.siglip()
        h = mot.hidden_size
        self.hidden_size = h
        self.latent_channels = int(config.vae.get("channels", 16))
        self.patch_latent_dim = config.latent_patch_size ** 2 * self.latent_channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.language_model = MoTForCausalLM(mot)
            self.vit_model = SigLIPVisionModel(vit)
            self.connector = MLPConnector(vit.hidden_size, h, config.connector_act)
            self.vit_pos_embed = PositionEmbedding(vit.grid_side, h)
            self.time_embedder = TimestepEmbedder(h)
            self.vae2llm = nn.Linear(self.patch_latent_dim, h)
            self.llm2vae = nn.Linear(h, self.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(config.max_latent_size, h)
            for name, module in unigendet_heads(h, self.patch_latent_dim).items():
                setattr(self, name, module)
        nn.init.zeros_(self.llm2vae.weight)  # BAGEL: the velocity head starts at zero
        nn.init.zeros_(self.llm2vae.bias)
        self.attention_backend: Optional[str] = None
        # The VAE is external: not a submodule (so state dicts hold BAGEL's keys only), built lazily.
        self.__dict__["_vae"] = vae
        self._tokenizer: Optional[Tokenizer] = None
        self._transform = eval_transform(config.preprocess)  # the VAE image (BAGEL's resize)
        self._vit_resize = BagelResize(**{k: int(v) for k, v in config.vit_resize.items()})
        self._normalise = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                                     T.Normalize(config.preprocess["mean"], config.preprocess["std"])])
        self.random_heads: list[str] = []       # heads the loaded weights lacked (from_pretrained)
        self.allow_random_heads = False
        self.source: Optional[str] = None       # the folder it was loaded from

    # ---- plumbing -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.config.tokenizer, self.config.mot().vocab_size)
        return self._tokenizer

    @property
    def vae(self) -> nn.Module:
        """The FLUX AE as a diffusers AutoencoderKL: from ``vae.path`` (BAGEL's ``ae.safetensors``,
        a folder holding it, or a diffusers folder) or a seeded random ``vae.init``."""
        if self._vae is None:
            self.__dict__["_vae"] = build_vae(self.config.vae).to(self.device)
        return self._vae

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._vae is not None:
            self._vae._apply(fn, recurse)
        return self

    def __deepcopy__(self, memo):
        """Deep copies (DIGA's teacher) share the frozen external VAE instead of copying it."""
        if self._vae is not None:
            memo[id(self._vae)] = self._vae
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    @property
    def gradient_checkpointing(self) -> bool:
        return self.language_model.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.language_model.model.gradient_checkpointing = bool(on)

    # ---- images and latents ---------------------------------------------------------------------
    def latent_grid(self, latents_hw: tuple[int, int]) -> tuple[int, int]:
        p = self.config.latent_patch_size
        return latents_hw[0] // p, latents_hw[1] // p

    @torch.no_grad()
    def encode_latents(self, pixels: Images, *, sample: Optional[bool] = None,
                       seed: Optional[Union[int, Sequence[int]]] = None) -> Images:
        """[-1, 1] VAE images → scaled latents ``scale·(z − shift)``, per image (a list in, a list
        out; a batch tensor in, a batch tensor out).

        ``z`` is sampled from the posterior as BAGEL does (``DiagonalGaussian(sample=True)``) unless
        ``sample=False`` (its mode). Each image's noise comes from a CPU generator seeded with
        ``seed`` (default ``config.latent_seed``; a sequence gives one seed per image, as training
        draws), so an image's latents do not depend on the other images of its batch. Same-size
        images share one VAE call."""
        sample = self.config.latent_sample if sample is None else sample
        images = _as_list(pixels)
        seed = self.config.latent_seed if seed is None else seed
        seeds = [seed] * len(images) if isinstance(seed, int) else list(seed)
        seeds = [self.config.latent_seed if x is None else int(x) for x in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        out: list[Optional[torch.Tensor]] = [None] * len(images)
        for idxs in _same_shape_groups(images):
            gens = [torch.Generator().manual_seed(seeds[i]) for i in idxs] if sample else None
            z = vae_encode(self.vae, torch.stack([images[i] for i in idxs]).to(self.device), self.config.vae,
                           sample=sample, generator=gens)
            for j, i in enumerate(idxs):
                out[i] = z[j]
        return torch.stack(out) if isinstance(pixels, torch.Tensor) else out

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [0, 1]."""
        return vae_decode(self.vae, latents, self.config.vae)

    def vit_image(self, vae_pixels: torch.Tensor) -> torch.Tensor:
        """The SigLIP image of one VAE-sized image: BAGEL's ``ImageTransform(980, 224, 14)`` rule
        applied to it. The public code resizes the 8-bit PIL VAE image; the normalised tensor holds
        exactly those 8-bit values (it came from that PIL image), so they are recovered and resized
        by PIL too — the same pixels as upstream, for paths, PIL images and scan batches alike."""
        pp = self.config.preprocess
        mean = torch.tensor(pp["mean"], device=vae_pixels.device).view(3, 1, 1)
        std = torch.tensor(pp["std"], device=vae_pixels.device).view(3, 1, 1)
        u8 = ((vae_pixels.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        w, h = self._vit_resize.size_of(u8.shape[-1], u8.shape[-2])
        if (w, h) == (u8.shape[-1], u8.shape[-2]):
            return vae_pixels.float()
        img = self._vit_resize(Image.fromarray(u8.permute(1, 2, 0).cpu().numpy()))
        return self._normalise(img).to(vae_pixels.device)

    # ---- packing and the forward pass -------------------------------------------------------
    def _latent_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        side = self.config.max_latent_size
        if max(grid) > side:
            raise ValueError(f"a {grid[0]}x{grid[1]} latent token grid exceeds max_latent_size {side}")
        return position_ids(*grid, side, self.device)

    def _im(self, ids: Sequence[int]) -> list[int]:
        return [self.tokenizer.im_start, *ids, self.tokenizer.im_end]

    def _vit_features(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Per image: connector(SigLIP tokens) + ViT position embedding (n_i, H), and its grid.
        Same-size images share one SigLIP call."""
        patch = self.vit_model.config.patch_size
        dtype = self.vit_model.vision_model.embeddings.patch_embedding.weight.dtype
        feats: list[Optional[torch.Tensor]] = [None] * len(images)
        for idxs in _same_shape_groups(images):
            tokens, ids = self.vit_model(torch.stack([images[i] for i in idxs]).to(self.device, dtype))
            group = self.connector(tokens) + self.vit_pos_embed(ids)
            for j, i in enumerate(idxs):
                feats[i] = group[j]
        grids = [(im.shape[-2] // patch, im.shape[-1] // patch) for im in images]
        return feats, grids

    def forward(self, det: Optional[DetInputs] = None, gen: Optional[GenInputs] = None, *,
                return_layers: Sequence[int] = (), kv_cache: Any = None) -> PackOutput:
        """Pack detection samples, then generation samples, run the MoT once, read the heads.

        ``kv_cache``: handed to the MoT, which stores every layer's keys and values in it (the
        prefill of cached decoding, :mod:`aigid.models.unigendet.decode`)."""
        if det is None and gen is None:
            raise ValueError("UniGenDet.forward needs detection and/or generation inputs")
        tok, b = self.tokenizer, PackBuilder(self.tokenizer)
        p = self.config.latent_patch_size
        latent_tokens, latent_t, latent_ids = [], [], []
        vit_feats: list[torch.Tensor] = []
        vit_grids: list[tuple[int, int]] = []
        vit_spans: list[list[int]] = []
        n_det = n_gen = 0
        if det is not None:
            vit_images, lat_images = _as_list(det.vit_pixels), _as_list(det.latents)
            n_det = len(vit_images)
            _check_batch("det", n_det, latents=len(lat_images), questions=len(det.question_ids),
                         answers=None if det.answer_ids is None else len(det.answer_ids),
                         prefixes=None if det.prefix_ids is None else len(det.prefix_ids),
                         mids=None if det.mid_ids is None else len(det.mid_ids))
            vit_feats, vit_grids = self._vit_features(vit_images)
            for i in range(n_det):
                lat = patchify_latents(lat_images[i][None].to(self.device), p)[0]
                b.sample()
                if det.prefix_ids is not None and det.prefix_ids[i] is not None:
                    b.text(self._im(det.prefix_ids[i]))
                b.image("vae", lat.shape[0])
                if det.mid_ids is not None and det.mid_ids[i] is not None:
                    b.text(self._im(det.mid_ids[i]))
                vit_spans.append(b.image("vit", vit_feats[i].shape[0]))
                if det.question_ids[i] is not None:
                    b.text(self._im(det.question_ids[i]))
                if det.answer_ids is None:
                    answer = [tok.im_start]
                else:
                    answer = [tok.im_start, *det.answer_ids[i]] + ([tok.im_end] if det.close_answer else [])
                b.cls_pos.append(b.text(answer, labels=det.answer_ids is not None))
                b.answer_last.append(b.cur - 1)
                latent_tokens.append(lat)
                latent_t.append(torch.zeros(lat.shape[0], device=self.device))
                latent_ids.append(self._latent_ids(self.latent_grid(lat_images[i].shape[-2:])))
        if gen is not None:
            n_gen = gen.x_t.shape[0]
            _check_batch("gen", n_gen, prompts=len(gen.prompt_ids), t=gen.t.shape[0])
            if gen.x_t.ndim != 3 or gen.x_t.shape[1] != gen.grid[0] * gen.grid[1] \
                    or gen.x_t.shape[2] != self.patch_latent_dim:
                raise ValueError(f"x_t must be (N, {gen.grid[0] * gen.grid[1]}, {self.patch_latent_dim}), "
                                 f"got {tuple(gen.x_t.shape)}")
            for i in range(n_gen):
                b.sample()
                if gen.prompt_ids[i] is not None:
                    b.text(self._im(gen.prompt_ids[i]))
                b.gen_pos.extend(b.image("vae", gen.x_t.shape[1], hidden=True))
            latent_tokens.append(gen.x_t.to(self.device).flatten(0, 1))
            latent_t.append(gen.t.to(self.device, torch.float32).repeat_interleave(gen.x_t.shape[1]))
            latent_ids.append(self._latent_ids(gen.grid).repeat(n_gen))

        dev = self.device
        idx = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        # Markers inside VAE splits are text: only the latents go to the generation expert.
        layout = PackedLayout.build(b.samples, device=dev).with_gen_index(idx(b.vae_pos))
        embed = self.language_model.model.embed_tokens
        x = embed.weight.new_zeros(layout.total, self.hidden_size)
        x = x.index_put((idx(b.text_pos),), embed(idx(b.text_ids)))
        if vit_feats:
            x = x.index_put((idx(b.vit_pos),), torch.cat(vit_feats).to(x.dtype))
        lat_in = self.vae2llm(torch.cat(latent_tokens).to(self.vae2llm.weight.dtype))
        lat_in = lat_in + self.time_embedder(torch.cat(latent_t)) + self.latent_pos_embed(torch.cat(latent_ids))
        x = x.index_put((idx(b.vae_pos),), lat_in.to(x.dtype))

        mot_kwargs = {} if kv_cache is None else {"kv_cache": kv_cache}
        out = self.language_model.model(x, layout, return_layers=tuple(return_layers),
                                        attention_backend=self.attention_backend, **mot_kwargs)
        h = out.last_hidden_state
        res = PackOutput(hidden=h, layer_outputs=dict(out.layer_outputs), layout=layout)
        if n_det:
            res.cls_logits = self.fake_cls_head(h[idx(b.cls_pos)])
            res.answer_last = idx(b.answer_last)
            if len(set(vit_grids)) == 1:
                res.vit_index, res.vit_grid = idx(vit_spans), vit_grids[0]
            else:
                res.vit_index, res.vit_grid = [idx(s) for s in vit_spans], vit_grids
            if b.label_pos:
                res.answer_logits = self.language_model.lm_head(h[idx(b.label_pos)])
                res.answer_labels = idx(b.label_ids)
        if n_gen:
            res.gen_vae_index = idx(b.gen_pos).view(n_gen, -1)
            res.velocity = self.llm2vae(h[res.gen_vae_index])
        return res

    # ---- inputs from images and text ----------------------------------------------------------
    def preprocess(self, images: ImageInput) -> list[torch.Tensor]:
        """Images in any form ``predict`` takes → per-image VAE images (BAGEL's resize: aspect
        kept, no crop), each (3, H_i, W_i) normalised to [-1, 1] on this model's device. Float
        tensors are taken as already preprocessed: a (N, 3, H, W) batch, a (3, H, W) image, or a
        list of (3, H_i, W_i). An unusable item raises ``InputError`` naming it."""
        return self._prepare(images, "raise")[0]

    def _prepare(self, images: ImageInput, errors: Errors) -> tuple[list[torch.Tensor], Prepared]:
        prep = prepare(images, self._transform, errors=errors)  # shared with MiraGe: same inputs
        return [im.to(self.device) for im in prep.pixels], prep

    def detection_inputs(self, pixels: Images, *, vit_pixels: Optional[Images] = None,
                         latents: Optional[Images] = None, answers: Optional[Sequence[str]] = None,
                         close_answer: bool = True, question: Optional[str] = None) -> DetInputs:
        """VAE images → their SigLIP images (unless given), VAE latents (encoded unless given) and
        token ids of ``question`` (default ``config.question``, FakeClue's training question)."""
        images = [im.to(self.device) for im in _as_list(pixels)]
        vit = [self.vit_image(im) for im in images] if vit_pixels is None else _as_list(vit_pixels)
        if latents is None:
            latents = self.encode_latents(images)
        q = self.tokenizer.encode(self.config.question if question is None else question)
        ans = None if answers is None else [self.tokenizer.encode(a) for a in answers]
        return DetInputs(vit, [z.to(self.device) for z in _as_list(latents)], [q] * len(images), ans,
                         close_answer)

    # ---- inference ----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16,  # off only when set_precision chose fp32
                              enabled=self.device.type == "cuda" and getattr(self, "precision", "bf16") == "bf16")

    def check_ready(self, verdict: Optional[str] = None) -> None:
        """Raise when this model cannot score: a head-less load (a BAGEL base without a
        fine-tuned checkpoint) asked for ``verdict="head"``."""
        verdict = verdict or self.config.verdict
        if verdict not in ("head", "text"):
            raise ValueError(f"verdict must be 'head' or 'text', got {verdict!r}")
        if verdict == "head" and "fake_cls_head" in self.random_heads and not self.allow_random_heads:
            raise MissingHeadError(
                f"{self.source or 'this UniGenDet'} has no fake_cls_head (a BAGEL base without the "
                "fine-tuned UniGenDet checkpoint): load it with checkpoint=<fine-tuned weights> (CLI: "
                "--checkpoint), or "
                "pass allow_random_heads=True to start training from a randomly initialised head")

    @torch.no_grad()
    def detect_logits(self, pixels: Images, latents: Optional[Images] = None) -> torch.Tensor:
        """(N, 2) fake_cls_head logits (class 0 = fake) for VAE images (see ``preprocess``)."""
        self.check_ready("head")
        with self._autocast():
            return self(det=self.detection_inputs(pixels, latents=latents)).cls_logits.float()

    @property
    def transform(self) -> Transform:
        """An RGB PIL image → this detector's VAE image (BAGEL's resize, [-1, 1]; its preprocessing)."""
        return self._transform

    @torch.no_grad()
    def score_prepared(self, prep: Prepared, *, verdict: Optional[str] = None,
                       max_new_tokens: Optional[int] = None, calibrated: bool = True,
                       latents: Optional[Images] = None) -> torch.Tensor:
        """P(fake) for one prepared chunk (``aigid.data.transforms.Prepared``, images of any sizes),
        one per item given, NaN where an item was left out; ``latents``: one per item given."""
        verdict = verdict or self.config.verdict
        self.check_ready(verdict)
        pixels = [im.to(self.device) for im in prep.pixels]
        if latents is not None and prep.errors:
            lat = _as_list(latents)
            latents = [lat[i] for i in prep.kept]
        scores = torch.zeros(0)  # stays empty when no item was usable (errors="skip")
        if pixels and verdict == "head":
            scores = self.detect_logits(pixels, latents).softmax(-1)[:, FAKE_CLASS].cpu()
        elif pixels:
            texts = self.explain(pixels, latents=latents, greedy=True,
                                 question=self.config.question + self.config.answer_format_hint,
                                 max_new_tokens=max_new_tokens or self.config.text_max_new_tokens)
            labels = [parse_verdict(t) for t in texts]
            scores = torch.tensor([float("nan") if v is None else float(v) for v in labels])
        scores = prep.scatter(scores)
        return calibrate_scores(self.config, scores) if calibrated and verdict == "head" else scores

    def _scored_chunks(self, images: ImageInput, latents: Optional[Images], batch_size: Optional[int],
                       errors: Errors, workers: Optional[int], **score: Any
                       ) -> tuple[Iterator[Prepared], Callable[[Prepared], torch.Tensor]]:
        self.check_ready(score.get("verdict"))
        lat = None if latents is None else _as_list(latents)
        size = batch_size or default_batch_size(self.device, cuda=16, cpu=4)
        chunks = prepared_chunks(images, self._transform, size, errors=errors, workers=workers)

        def scorer(prep: Prepared) -> torch.Tensor:
            part = None if lat is None else lat[prep.offset:prep.offset + prep.count]
            return self.score_prepared(prep, latents=part, **score)
        return chunks, scorer

    def predict(self, images: ImageInput, latents: Optional[Images] = None, *,
                verdict: Optional[str] = None, max_new_tokens: Optional[int] = None,
                errors: Errors = "raise", return_errors: bool = False, calibrated: bool = True,
                batch_size: Optional[int] = None, workers: Optional[int] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[int, str]]]:
        """P(fake) per image, (N,) float32 on CPU.

        ``images``: as MiraGe's ``predict`` takes them (paths, bytes, binary files, PIL images of
        any mode, uint8 arrays/tensors, each decoded as the same file on disk; a list or any
        iterable) or preprocessed float tensors (see ``preprocess``); ``latents``, when given, one
        per image. Decoded on ``workers`` threads and scored ``batch_size`` at a time (default 4
        on CPU, 16 on CUDA), so memory does not grow with their number (``predict_iter`` streams).
        ``verdict="head"`` (default ``config.verdict``): softmax of ``fake_cls_head``.
        ``verdict="text"``: greedy answer to the question + the public evaluation's format hint,
        parsed as ``eval/det/fakevlm_test.py`` does — 1.0 "fake", 0.0 "real", NaN when the answer
        says neither (the public script leaves such answers out of its accuracy). The paper's
        accuracy is this mode's.
        ``calibrated`` (default): a head score goes through ``config.calibration`` when one is
        stored (``aigid calibrate``); ``False`` gives the raw softmax. Text verdicts never do.

        ``errors="raise"`` (default): an unusable item raises ``aigid.data.images.InputError``
        naming its index, path or kind, and the reason. ``errors="skip"``: its score is NaN and a
        warning is logged; ``return_errors=True`` returns ``(scores, {index: reason})``."""
        chunks, scorer = self._scored_chunks(images, latents, batch_size, errors, workers, verdict=verdict,
                                             max_new_tokens=max_new_tokens, calibrated=calibrated)
        return collect(chunks, scorer, return_errors)

    def predict_iter(self, images: ImageInput, latents: Optional[Images] = None, *,
                     verdict: Optional[str] = None, max_new_tokens: Optional[int] = None,
                     errors: Errors = "raise", return_errors: bool = False, calibrated: bool = True,
                     batch_size: Optional[int] = None, workers: Optional[int] = None
                     ) -> Iterator[Union[float, tuple[float, Optional[str]]]]:
        """``predict`` as a stream: P(fake) per item in input order as each batch finishes
        (``(score, reason or None)`` with ``return_errors``)."""
        chunks, scorer = self._scored_chunks(images, latents, batch_size, errors, workers, verdict=verdict,
                                             max_new_tokens=max_new_tokens, calibrated=calibrated)
        return stream(chunks, scorer, return_errors)

    @property
    def threshold(self) -> float:
        """Label = fake when P(fake) > this: the threshold stored by ``aigid calibrate``, else 0.5."""
        return stored_threshold(self.config)

    @torch.no_grad()
    def explain(self, images: ImageInput, max_new_tokens: int = 256, temperature: float = 0.7,
                top_p: float = 0.8, top_k: int = 20, repetition_penalty: float = 1.05,
                greedy: bool = False, seed: int = 0, latents: Optional[Images] = None,
                question: Optional[str] = None, use_cache: bool = True) -> Union[str, list[str]]:
        """Decode the answer after ``<|im_start|>`` (a str for one image, else a list).

        With ``use_cache`` (default) the image and question are run once and each new token reads
        the stored keys/values (``aigid.models.unigendet.decode``); ``use_cache=False`` re-runs
        the whole pack per token (the reference; same tokens)."""
        single = is_single(images)
        pixels = self.preprocess(images)
        det = self.detection_inputs(pixels, latents=latents, answers=[""] * len(pixels),
                                    close_answer=False, question=question)
        from aigid.models.unigendet.decode import decode_answers, decode_answers_uncached
        run = decode_answers if use_cache else decode_answers_uncached
        ids = run(self, det, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                  top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        texts = [self.tokenizer.decode(x) for x in ids]
        return texts[0] if single else texts

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], steps: Optional[int] = None, cfg: Optional[float] = None,
                 seed: int = 0, *, shift: Optional[float] = None, decode: bool = True,
                 cfg_renorm: Optional[str] = "global", size: Optional[int] = None,
                 preset: str = "default") -> Generated:
        """Text → latents by Euler integration of the flow from t = 1 (noise) to 0, with text CFG.

        ``steps`` is BAGEL's ``num_timesteps``: that many grid points, ``steps − 1`` model calls.
        ``preset``: ``"default"`` (``config``'s CFG interval and size) or ``"paper-fid"`` (1024²,
        CFG over the whole schedule, the paper's FID setting); explicit arguments win."""
        if preset not in GENERATION_PRESETS:
            raise ValueError(f"unknown preset {preset!r} ({', '.join(GENERATION_PRESETS)})")
        if isinstance(prompts, str):
            prompts = [prompts]
        c, pre = self.config, GENERATION_PRESETS[preset]
        steps, cfg, shift = steps or c.sample_steps, c.cfg_scale if cfg is None else cfg, shift or c.sample_shift
        size = size or pre["size"] or c.vae_image_size
        interval = tuple(pre["cfg_interval"] or c.cfg_interval)
        down = int(c.vae.get("downsample", 8)) * c.latent_patch_size
        if size % down:
            raise ValueError(f"image size {size} is not a multiple of {down} (VAE ×{down // c.latent_patch_size}"
                             f" and {c.latent_patch_size}×{c.latent_patch_size} latent patches)")
        grid = (size // down, size // down)
        ids = [self.tokenizer.encode(p) for p in prompts]
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(len(ids), grid[0] * grid[1], self.patch_latent_dim, generator=g).to(self.device)

        def velocity(x, t, guided):
            n = x.shape[0]
            prompt_ids = ids + ([None] * n if guided else [])
            xx, tt = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
            with self._autocast():
                v = self(gen=GenInputs(prompt_ids, xx, tt, grid)).velocity.float()
            return (v[:n], v[n:]) if guided else (v, None)

        tokens = flow.euler_sample(velocity, noise, steps=steps, shift=shift, cfg_scale=cfg,
                                   cfg_interval=interval, renorm=cfg_renorm)
        latents = unpatchify_latents(tokens, grid, c.latent_patch_size, self.latent_channels)
        images = self.decode_latents(latents) if decode and has_vae(c.vae, self._vae) else None
        return Generated(latents=latents, images=images)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike],
                        summary: Optional[dict[str, Any]] = None) -> None:
        """config.json (with HF-style ``model_type``/``architectures``/``id2label``) +
        model.safetensors (BAGEL/UniGenDet keys) + README.md (the model card; ``summary``: a
        training summary, for its data and metrics); a seeded random VAE that was built is saved
        beside them (vae.safetensors); a VAE from ``vae.path`` stays referenced."""
        os.makedirs(directory, exist_ok=True)
        save_state_dict(os.path.join(directory, WEIGHTS_FILE), self.state_dict())
        if self._vae is not None and not self.config.vae.get("path"):
            save_state_dict(os.path.join(directory, VAE_FILE), self._vae.state_dict())
        raw = asdict(self.config)
        raw["cfg_interval"] = list(raw["cfg_interval"])
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({**hf_fields("unigendet"), **raw}, f, indent=2)
        write_model_card(directory, self, summary)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], checkpoint: Optional[Union[str, os.PathLike]] = None,
                        *, config: Optional[UniGenDetConfig] = None, weights: Optional[str] = None,
                        allow_random_heads: bool = False, map_location: str = "cpu",
                        dtype: Optional[torch.dtype] = None, **_: Any) -> "UniGenDet":
        """Our saved folder, or a BAGEL base folder plus an optional fine-tuned ``checkpoint``.

        A base folder (``llm_config.json``, ``vit_config.json``, the tokenizer, ``ae.safetensors``,
        ``ema.safetensors``) is read as the public demo does: sizes from the configs, the folder as
        the tokenizer, its ``ae.safetensors`` as the VAE (unless ``config.vae["path"]`` names one),
        and ``checkpoint`` (a safetensors file, or a folder holding one) merged over the base
        weights — the checkpoint's tensors win, the base fills what it lacks. A folder with several
        weight files is an error unless ``weights`` names the base file. Which file supplied how
        many tensors is logged (``logging``, ``aigid.models.unigendet.release``).

        Heads the loaded weights lack (a plain BAGEL base has no ``fake_cls_head``) are randomly
        initialised and recorded in ``random_heads``; ``predict``/``detect_logits``/``scan`` then
        raise :class:`MissingHeadError` unless ``allow_random_heads=True`` (to train from a base).
        Release weights are assigned into a model built on the meta device (no second 7B copy);
        ``dtype`` casts everything (e.g. ``torch.bfloat16``).
        """
        return load_pretrained(cls, directory, checkpoint, config=config, weights=weights,
                               allow_random_heads=allow_random_heads, map_location=map_location, dtype=dtype)


# ---- helpers --------------------------------------------------------------------------------
def _as_list(images: Images) -> list[torch.Tensor]:
    return list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)


def _same_shape_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of same-shape images, grouped (first-seen order), for one batched call each."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return list(groups.values())


def _check_batch(what: str, n: int, **sizes: Optional[int]) -> None:
    for name, size in sizes.items():
        if size is not None and size != n:
            raise ValueError(f"{what} batch of {n} samples has {size} {name}")
