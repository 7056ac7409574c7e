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
import os
from dataclasses import asdict
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from aigid.data.transforms import ImageInput, eval_transform, to_pixels
from aigid.models.checkpoint import load_into, load_state_dict_dir, save_state_dict
from aigid.models.unigendet import flow
from aigid.models.unigendet.config import UniGenDetConfig
from aigid.models.unigendet.inputs import DetInputs, GenInputs, Generated, PackBuilder, PackOutput
from aigid.models.unigendet.modules import (MLPConnector, PositionEmbedding, TimestepEmbedder,
                                            patchify_latents, sincos_2d, unigendet_heads,
                                            unpatchify_latents)
from aigid.models.unigendet.mot import MoTForCausalLM
from aigid.models.unigendet.release import build_vae, has_vae, release_config, release_to_ours
from aigid.models.unigendet.sampling import next_token
from aigid.models.unigendet.siglip import SigLIPVisionModel, position_ids
from aigid.models.unigendet.tokenizer import Tokenizer, build_tokenizer
from aigid.packing import PackedLayout

__all__ = ["UniGenDetConfig", "UniGenDet", "DetInputs", "GenInputs", "PackOutput", "Generated",
           "FAKE_CLASS", "REAL_CLASS", "fake_label_to_class", "detection_loss", "patchify_latents",
           "unpatchify_latents", "sincos_2d"]

CONFIG_FILE, WEIGHTS_FILE, VAE_FILE = "config.json", "model.safetensors", "vae.safetensors"
FAKE_CLASS, REAL_CLASS = 0, 1                      # fake_cls_head's class order (the released code's)
UNIGENDET_ONLY = ("fake_cls_head.", "diga_mlp.", "latent_to_vit_connector.")  # absent from BAGEL releases


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
        self._transform = eval_transform(config.preprocess)

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
        """The FLUX-style AutoencoderKL (diffusers), from ``vae.path`` or a seeded ``vae.init``."""
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

    # ---- latents ------------------------------------------------------------------------------
    def latent_grid(self, latents_hw: tuple[int, int]) -> tuple[int, int]:
        p = self.config.latent_patch_size
        return latents_hw[0] // p, latents_hw[1] // p

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels (N, 3, H, W) → scaled latents ``scale·(mode(z) − shift)`` (N, C, h, w).

        BAGEL samples z from the posterior; the mode keeps ``predict`` deterministic."""
        vae, spec = self.vae, self.config.vae
        z = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype)).latent_dist.mode()
        return ((z - spec.get("shift", 0.0)) * spec.get("scale", 1.0)).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [0, 1]."""
        vae, spec = self.vae, self.config.vae
        z = latents / spec.get("scale", 1.0) + spec.get("shift", 0.0)
        x = vae.decode(z.to(next(vae.parameters()).dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ---- packing and the forward pass -------------------------------------------------------
    def _latent_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        side = self.config.max_latent_size
        if max(grid) > side:
            raise ValueError(f"a {grid[0]}x{grid[1]} latent token grid exceeds max_latent_size {side}")
        return position_ids(*grid, side, self.device)

    def _im(self, ids: Sequence[int]) -> list[int]:
        return [self.tokenizer.im_start, *ids, self.tokenizer.im_end]

    def forward(self, det: Optional[DetInputs] = None, gen: Optional[GenInputs] = None, *,
                return_layers: Sequence[int] = ()) -> PackOutput:
        """Pack detection samples, then generation samples, run the MoT once, read the heads."""
        if det is None and gen is None:
            raise ValueError("UniGenDet.forward needs detection and/or generation inputs")
        tok, b = self.tokenizer, PackBuilder(self.tokenizer)
        p = self.config.latent_patch_size
        latent_tokens, latent_t, latent_ids = [], [], []
        vit_feats = vit_grid = None
        n_det = n_gen = 0
        if det is not None:
            n_det = det.vit_pixels.shape[0]
            _check_batch("det", n_det, latents=det.latents.shape[0], questions=len(det.question_ids),
                         answers=None if det.answer_ids is None else len(det.answer_ids),
                         prefixes=None if det.prefix_ids is None else len(det.prefix_ids))
            patch_w = self.vit_model.vision_model.embeddings.patch_embedding.weight
            vit_tokens, vit_ids = self.vit_model(det.vit_pixels.to(self.device, patch_w.dtype))
            vit_grid = (det.vit_pixels.shape[-2] // self.vit_model.config.patch_size,
                        det.vit_pixels.shape[-1] // self.vit_model.config.patch_size)
            vit_feats = self.connector(vit_tokens) + self.vit_pos_embed(vit_ids)
            lat = patchify_latents(det.latents.to(self.device), p)
            grid = self.latent_grid(det.latents.shape[-2:])
            for i in range(n_det):
                b.sample()
                if det.prefix_ids is not None and det.prefix_ids[i] is not None:
                    b.text(self._im(det.prefix_ids[i]))
                b.image("vae", lat.shape[1])
                b.image("vit", vit_feats.shape[1])
                b.text(self._im(det.question_ids[i]))
                if det.answer_ids is None:
                    answer = [tok.im_start]
                else:
                    answer = [tok.im_start, *det.answer_ids[i]] + ([tok.im_end] if det.close_answer else [])
                b.cls_pos.append(b.text(answer, labels=det.answer_ids is not None))
                b.answer_last.append(b.cur - 1)
            latent_tokens.append(lat.flatten(0, 1))
            latent_t.append(torch.zeros(lat.shape[0] * lat.shape[1], device=self.device))
            latent_ids.append(self._latent_ids(grid).repeat(n_det))
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
        if vit_feats is not None:
            x = x.index_put((idx(b.vit_pos),), vit_feats.flatten(0, 1).to(x.dtype))
        lat_in = self.vae2llm(torch.cat(latent_tokens).to(self.vae2llm.weight.dtype))
        lat_in = lat_in + self.time_embedder(torch.cat(latent_t)) + self.latent_pos_embed(torch.cat(latent_ids))
        x = x.index_put((idx(b.vae_pos),), lat_in.to(x.dtype))

        out = self.language_model.model(x, layout, return_layers=tuple(return_layers),
                                        attention_backend=self.attention_backend)
        h = out.last_hidden_state
        res = PackOutput(hidden=h, layer_outputs=dict(out.layer_outputs), layout=layout)
        if n_det:
            res.cls_logits = self.fake_cls_head(h[idx(b.cls_pos)])
            res.answer_last = idx(b.answer_last)
            res.vit_index = idx(b.vit_pos).view(n_det, -1)
            res.vit_grid = vit_grid
            if b.label_pos:
                res.answer_logits = self.language_model.lm_head(h[idx(b.label_pos)])
                res.answer_labels = idx(b.label_ids)
        if n_gen:
            res.gen_vae_index = idx(b.gen_pos).view(n_gen, -1)
            res.velocity = self.llm2vae(h[res.gen_vae_index])
        return res

    # ---- inputs from images and text ----------------------------------------------------------
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """PIL images / paths / a batch tensor → normalised pixels on this model's device."""
        return to_pixels(images, self._transform, self.device)

    def _resize(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        if pixels.shape[-2:] == (size, size):
            return pixels
        return F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def detection_inputs(self, pixels: torch.Tensor, *, latents: Optional[torch.Tensor] = None,
                         answers: Optional[Sequence[str]] = None, close_answer: bool = True) -> DetInputs:
        """Normalised pixels → SigLIP-sized pixels, VAE latents (encoded unless given), token ids."""
        pixels = pixels.to(self.device)
        vit = self._resize(pixels, self.config.vit_image_size)
        if latents is None:
            latents = self.encode_latents(self._resize(pixels, self.config.vae_image_size))
        q = self.tokenizer.encode(self.config.question)
        n = pixels.shape[0]
        ans = None if answers is None else [self.tokenizer.encode(a) for a in answers]
        return DetInputs(vit, latents.to(self.device), [q] * n, ans, close_answer)

    # ---- inference ----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def detect_logits(self, pixels: torch.Tensor, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, 2) fake_cls_head logits (class 0 = fake) for normalised pixels."""
        with self._autocast():
            return self(det=self.detection_inputs(pixels, latents=latents)).cls_logits.float()

    @torch.no_grad()
    def predict(self, images: ImageInput, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P(fake) per image, (N,) float32 on CPU. Tensors must already be preprocessed."""
        return self.detect_logits(self.preprocess(images), latents).softmax(-1)[:, FAKE_CLASS].cpu()

    @torch.no_grad()
    def explain(self, images: ImageInput, max_new_tokens: int = 256, temperature: float = 0.7,
                top_p: float = 0.8, top_k: int = 20, repetition_penalty: float = 1.05,
                greedy: bool = False, seed: int = 0,
                latents: Optional[torch.Tensor] = None) -> Union[str, list[str]]:
        """Decode the answer after ``<|im_start|>`` (a str for one image, else a list).

        A plain loop without a KV cache: each new token re-runs the whole pack (correct, and
        quadratic in the answer length; a cached decoder is future work).
        """
        single = isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3)
        pixels = self.preprocess(images)
        det = self.detection_inputs(pixels, latents=latents, answers=[""] * pixels.shape[0], close_answer=False)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        done = [False] * pixels.shape[0]
        for _ in range(max_new_tokens):
            with self._autocast():
                out = self(det=det)
            logits = self.language_model.lm_head(out.hidden[out.answer_last]).float().cpu()
            for i, row in enumerate(logits):
                if done[i]:
                    continue
                nxt = next_token(row, det.answer_ids[i], greedy, temperature, top_k, top_p,
                                  repetition_penalty, gen)
                if nxt == self.tokenizer.im_end:
                    done[i] = True
                else:
                    det.answer_ids[i].append(nxt)
            if all(done):
                break
        texts = [self.tokenizer.decode(ids) for ids in det.answer_ids]
        return texts[0] if single else texts

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], steps: Optional[int] = None, cfg: Optional[float] = None,
                 seed: int = 0, *, shift: Optional[float] = None, decode: bool = True,
                 cfg_renorm: Optional[str] = "global") -> Generated:
        """Text → latents by Euler integration of the flow from t = 1 (noise) to 0, with text CFG."""
        if isinstance(prompts, str):
            prompts = [prompts]
        c = self.config
        steps, cfg, shift = steps or c.sample_steps, c.cfg_scale if cfg is None else cfg, shift or c.sample_shift
        down = int(c.vae.get("downsample", 8)) * c.latent_patch_size
        grid = (c.vae_image_size // down, c.vae_image_size // down)
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
                                   cfg_interval=tuple(c.cfg_interval), renorm=cfg_renorm)
        latents = unpatchify_latents(tokens, grid, c.latent_patch_size, self.latent_channels)
        images = self.decode_latents(latents) if decode and has_vae(c.vae, self._vae) else None
        return Generated(latents=latents, images=images)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """config.json + model.safetensors (BAGEL/UniGenDet keys); a seeded random VAE that was
        built is saved beside them (vae.safetensors); a VAE from ``vae.path`` stays referenced."""
        os.makedirs(directory, exist_ok=True)
        save_state_dict(os.path.join(directory, WEIGHTS_FILE), self.state_dict())
        if self._vae is not None and not self.config.vae.get("path"):
            save_state_dict(os.path.join(directory, VAE_FILE), self._vae.state_dict())
        raw = asdict(self.config)
        raw["cfg_interval"] = list(raw["cfg_interval"])
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(raw, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], config: Optional[UniGenDetConfig] = None,
                        map_location: str = "cpu", dtype: Optional[torch.dtype] = None, **_: Any) -> "UniGenDet":
        """Our saved folder, or a BAGEL/UniGenDet release folder (``ema.safetensors``).

        For a release folder the config is ``config``, else ``bagel-7b`` with the sizes read from
        the folder's ``llm_config.json`` / ``vit_config.json`` when present and the folder as the
        tokenizer path. A plain BAGEL release lacks the UniGenDet heads, which keep their init.
        The VAE is not read from the folder (BAGEL's ``ae.safetensors`` is in BFL's layout): set
        ``config.vae["path"]`` to a diffusers AutoencoderKL folder of the FLUX AE. Release
        weights are assigned into a model built on the meta device (no second 7B copy); ``dtype``
        casts everything (e.g. ``torch.bfloat16``).
        """
        directory = os.fspath(directory)
        ours = os.path.join(directory, CONFIG_FILE)
        raw = None
        if os.path.isfile(ours):
            with open(ours) as f:
                raw = json.load(f)
        if raw is not None and raw.get("arch") == "unigendet" and os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
            model = cls(config or UniGenDetConfig.from_dict(raw))
            load_into(model, load_file(os.path.join(directory, WEIGHTS_FILE), device=map_location), strict=True)
            vae_file = os.path.join(directory, VAE_FILE)
            if os.path.isfile(vae_file):
                model.vae.load_state_dict(load_file(vae_file, device=map_location))
            return model
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory!r} is neither a saved UniGenDet nor a BAGEL release folder")
        config = config or release_config(directory)
        with torch.device("meta"):
            model = cls(config)
        state = release_to_ours(load_state_dict_dir(directory), model)
        report = load_into(model, state, strict=False, dtype=dtype)
        missing = [k for k in report.missing if not k.startswith(UNIGENDET_ONLY)]
        if missing or report.unexpected:
            raise ValueError(f"{directory}: release checkpoint does not match this config; missing "
                             f"{missing[:8]}, unexpected {list(report.unexpected)[:8]}")
        fresh = unigendet_heads(model.hidden_size, model.patch_latent_dim)  # a plain BAGEL release
        for name, module in fresh.items():
            if any(k.startswith(name + ".") for k in report.missing):
                setattr(model, name, module.to(dtype) if dtype is not None else module)
        if dtype is not None:
            model.to(dtype)
        return model.to(map_location)


# ---- helpers --------------------------------------------------------------------------------
def _check_batch(what: str, n: int, **sizes: Optional[int]) -> None:
    for name, size in sizes.items():
        if size is not None and size != n:
            raise ValueError(f"{what} batch of {n} samples has {size} {name}")
