"""MiraGe (arXiv 2508.01525): frozen CLIP + deep multimodal prompts + text-anchored SupCon.

Re-implementation (no official code exists). The image embedding h comes from the prompted
vision tower, the anchors e_Real/e_Fake from the prompted text tower on the class prompts
"X X Real." / "X X Fake." (or "a photo of a Real." with ``prompt_init="a photo of a"``).
Logits are logit_scale·cos(h, e_c) (CLIP's frozen scale) and

    L = L_ce + α·L_dis,

where L_dis is SupCon's L_out over the pool batch ∪ {e_Real, e_Fake} ∪ memory bank (M past,
detached image embeddings; FIFO), each image's positives being the same-label pool members
and its class anchor (see ``aigid.ops.supcon_bank_loss``). Only the prompts and their couplings
F_i train. Label 0 is real, 1 is fake; ``predict`` returns P(fake).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from aigid import ops
from aigid.data.chunks import prepared_chunks
from aigid.data.transforms import Errors, ImageInput, Prepared, Transform, eval_transform, to_pixels
from aigid.models.calibration import calibrate_scores, stored_threshold
from aigid.models.card import drop_hf_fields, hf_fields, write_model_card
from aigid.models.checkpoint import save_state_dict
from aigid.models.configs import shipped_config
from aigid.models.mirage.clip_backbone import build_backbone
from aigid.models.mirage.clip_prompts import DeepPrompts, PromptedTextEncoder, PromptedVisionEncoder
from aigid.models.mirage.memory_bank import MemoryBank
from aigid.models.streaming import collect, default_batch_size, stream

CONFIG_FILE, WEIGHTS_FILE, BACKBONE_FILE = "config.json", "model.safetensors", "backbone.safetensors"


@dataclass
class MiraGeConfig:
    """Where each value comes from is kept in ``sources`` of the shipped JSON configs (paper =
    MiraGe, arXiv 2508.01525; MaPLe = upstream multimodal-prompt-learning; ours = our assumption).
    Fields added later have defaults, so older config.json files still load."""

    backbone: dict[str, Any]
    class_names: list[str] = field(default_factory=lambda: ["Real", "Fake"])  # paper
    prompt_tokens: int = 2     # B (paper)
    prompt_depth: int = 9      # L (paper)
    alpha: float = 0.3         # weight of L_dis (paper: 0.1–0.6 per dataset; 0.3 ours)
    temperature: float = 0.07  # τ of L_dis (SupContrast's default; ours)
    bank_size: int = 64        # M (paper)
    # θ_0 init: "random" (N(0, 0.02²), MaPLe without ctx_init; our default) or words whose first
    # B token embeddings start θ_0 (MaPLe's ctx_init "a photo of a"). Deeper θ_i stay random.
    prompt_init: str = "random"
    # Partial dicts are merged over the backbone's preprocessing (e.g. {"resize_mode": "none"}
    # for UnivFD-style crop-only); None keeps the backbone's (resize shortest side + crop).
    preprocess: Optional[dict[str, Any]] = None
    sources: dict[str, str] = field(default_factory=dict)  # provenance notes, not used by the model
    # aigid.models.calibration.Calibration.to_dict() (``aigid calibrate``): predict's calibration and
    # the stored threshold; None = raw scores, threshold 0.5.
    calibration: Optional[dict[str, Any]] = None
    arch: str = "mirage"

    @classmethod
    def named(cls, name: str) -> "MiraGeConfig":
        """A shipped config: ``tiny`` or ``vit-l-14`` (files in aigid/models/configs/)."""
        return cls(**shipped_config("mirage", name))




class MiraGe(nn.Module):
    def __init__(self, config: MiraGeConfig, cache_dir: Optional[str] = None, seed: int = 0,
                 download: bool = False):
        super().__init__()
        backbone = build_backbone(config.backbone, cache_dir=cache_dir, download=download)
        config.preprocess = {**backbone.preprocess, **(config.preprocess or {})}
        if not config.prompt_init:
            raise ValueError('prompt_init must be "random" or the words to start θ_0 from')
        self.config = config
        self.backbone_has_weights = backbone.has_weights
        self.clip = backbone.clip.eval().requires_grad_(False)
        text_width = self.clip.token_embedding.weight.shape[1] if hasattr(self.clip, "token_embedding") \
            else self.clip.text.width
        vision_width = self.clip.visual.class_embedding.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.prompts = DeepPrompts(config.prompt_tokens, config.prompt_depth, text_width, vision_width)
        context = None if config.prompt_init == "random" else config.prompt_init
        self.text_encoder = PromptedTextEncoder(self.clip, backbone.tokenizer, config.class_names,
                                                config.prompt_tokens, context=context)
        if context is not None:  # MaPLe: θ_0 from the words; deeper θ_i and every F_i random
            with torch.no_grad():
                self.prompts.text[0].copy_(self.text_encoder.context_embeddings())
        self.vision_encoder = PromptedVisionEncoder(self.clip)
        embed_dim = self.clip.text_projection.shape[1] if isinstance(self.clip.text_projection, torch.Tensor) \
            else self.clip.visual.output_dim
        self.bank = MemoryBank(config.bank_size, embed_dim)
        self._transform = eval_transform(config.preprocess)

    # ---- embeddings and logits -------------------------------------------------------------
    def train(self, mode: bool = True) -> "MiraGe":
        super().train(mode)
        self.clip.eval()  # the frozen backbone never switches to training behaviour
        return self

    def anchors(self) -> torch.Tensor:
        """(C, E) unit-norm class anchors e_c from the prompted text tower."""
        return F.normalize(self.text_encoder(self.prompts.text).float(), dim=-1)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, E) unit-norm image embeddings h from the prompted vision tower."""
        return F.normalize(self.vision_encoder(pixels, self.prompts.vision()).float(), dim=-1)

    def _anchors_for_inference(self) -> torch.Tensor:
        """Anchors cached across predict() calls: the text tower runs once per prompt update, not
        once per batch. The key holds the prompts' in-place version counters (an optimiser step
        or a load bumps them) and their device."""
        key = (self.device, *(p._version for p in self.prompts.parameters()))
        cached = getattr(self, "_anchor_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                self._anchor_cache = (key, self.anchors())
        return self._anchor_cache[1]

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.anchors() if torch.is_grad_enabled() else self._anchors_for_inference()
        h = self.embed_images(pixels)
        logits = self.clip.logit_scale.exp().float() * h @ e.T
        return {"logits": logits, "image_embeds": h, "anchors": e}

    def training_loss(self, pixels: torch.Tensor, labels: torch.Tensor,
                      gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      ) -> dict[str, torch.Tensor]:
        """L_ce + α·L_dis on one batch; pushes the batch's embeddings into the bank afterwards.

        ``gather`` (data-parallel training, ``aigid.training.gather.gatherer``) concatenates every
        rank's rows in rank order, gradients flowing back to this rank's: CE (averaged over the
        global batch), the SupCon pool and the bank push then see the global batch, so every
        rank computes the loss one process would with it, and keeps the same bank. A rank whose
        slice is empty (0 rows) still joins the gathers."""
        if gather is not None and pixels.shape[0] == 0:
            # open_clip cannot embed 0 images; rows cut from the anchors keep this rank in the
            # graph, whose backward is a collective every rank must join.
            e = self.anchors()
            out = {"anchors": e, "image_embeds": e[:0], "logits": e[:0] @ e.T}
        else:
            out = self(pixels)
        h, logits = out["image_embeds"], out["logits"]
        if gather is not None:  # one differentiable gather: one collective in the backward
            pooled = gather(torch.cat([h, logits.to(h.dtype)], 1))
            h, logits = pooled[:, :h.shape[1]], pooled[:, h.shape[1]:].to(logits.dtype)
            labels = gather(labels)
        ce = F.cross_entropy(logits, labels)
        bank_feats, bank_labels = self.bank.view()
        anchor_labels = torch.arange(out["anchors"].shape[0], device=labels.device)
        dis = ops.supcon_bank_loss(h, labels, bank_feats, bank_labels,
                                   out["anchors"], anchor_labels, self.config.temperature)
        self.bank.push(h, labels)
        return {"loss": ce + self.config.alpha * dis, "ce": ce.detach(), "dis": dis.detach(),
                "logits": logits.detach(), "labels": labels}

    # ---- inference ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.prompts.text.device

    def preprocess(self, images: ImageInput, errors: Errors = "raise") -> torch.Tensor:
        """Images in any form ``predict`` takes → normalised pixels (N, 3, H, W) on this model's
        device (``errors="skip"`` leaves unusable items out; see ``aigid.data.transforms.prepare``)."""
        return to_pixels(images, self._transform, self.device, errors=errors)

    @property
    def transform(self) -> Transform:
        """An RGB PIL image → this detector's normalised (3, H, W) pixels (its eval preprocessing)."""
        return self._transform

    def bf16_modules(self) -> list[nn.Module]:
        """What ``set_precision("bf16")`` casts on a CPU: the vision tower, where the time goes."""
        return [self.clip.visual]

    @torch.no_grad()
    def score_prepared(self, prep: Prepared, calibrated: bool = True) -> torch.Tensor:
        """P(fake) for one prepared chunk (``aigid.data.transforms.Prepared``), one per item given,
        NaN where an item was left out; float32 on CPU, calibrated unless ``calibrated=False``."""
        scores = torch.zeros(0)
        int8 = getattr(self, "int8_forward", None)
        if prep.kept and int8 is not None:  # set_precision("int8"): ONNX Runtime's int8 graph
            scores = int8(prep.stacked("cpu"))
        elif prep.kept:
            pixels = prep.stacked(self.device).to(self.clip.visual.conv1.weight.dtype)  # bf16 once recast
            autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                      enabled=pixels.is_cuda and getattr(self, "precision", "bf16") == "bf16")
            with autocast:
                logits = self(pixels)["logits"]
            scores = logits.float().softmax(-1)[:, 1].cpu()
        scores = prep.scatter(scores)
        return calibrate_scores(self.config, scores) if calibrated else scores

    def _chunks(self, images: ImageInput, batch_size: Optional[int], errors: Errors,
                workers: Optional[int]) -> Iterator[Prepared]:
        size = batch_size or default_batch_size(self.device, cuda=64, cpu=32)
        return prepared_chunks(images, self._transform, size, errors=errors, workers=workers)

    def predict(self, images: ImageInput, *, batch_size: Optional[int] = None, errors: Errors = "raise",
                return_errors: bool = False, calibrated: bool = True, workers: Optional[int] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[int, str]]]:
        """P(fake) per image, (N,) float32 on CPU; calibrated by ``config.calibration`` when one
        is stored (``aigid calibrate``) unless ``calibrated=False`` (the raw softmax).

        ``images``: one image, a list or any iterable — paths, bytes, binary file objects, PIL
        images of any mode, uint8 numpy arrays (H, W[, C]) or uint8 tensors ((C, H, W) / (H, W,
        C)), each decoded as the same file on disk would be and preprocessed by this detector — or
        a float tensor of pixels already preprocessed ((3, H, W) / (N, 3, H, W), see ``preprocess``).
        They are decoded on ``workers`` threads (default 2; 0: in this thread) and scored
        ``batch_size`` at a time (default 32 on CPU, 64 on CUDA), so memory does not grow with
        their number; ``predict_iter`` yields the scores as they come.

        ``errors="raise"`` (default): an unusable item raises ``aigid.data.images.InputError``
        naming its index, path or kind, and the reason. ``errors="skip"``: its score is NaN and a
        warning is logged; with ``return_errors=True`` the call returns ``(scores, {index:
        reason})`` so callers can tell which items were left out and why."""
        return collect(self._chunks(images, batch_size, errors, workers),
                       lambda prep: self.score_prepared(prep, calibrated), return_errors)

    def predict_iter(self, images: ImageInput, *, batch_size: Optional[int] = None, errors: Errors = "raise",
                     return_errors: bool = False, calibrated: bool = True, workers: Optional[int] = None
                     ) -> Iterator[Union[float, tuple[float, Optional[str]]]]:
        """``predict`` as a stream: P(fake) per item in input order, each batch's as it finishes
        (``(score, reason or None)`` with ``return_errors``); ``images`` may be an endless iterable."""
        return stream(self._chunks(images, batch_size, errors, workers),
                      lambda prep: self.score_prepared(prep, calibrated), return_errors)

    @property
    def threshold(self) -> float:
        """Label = fake when P(fake) > this: the threshold stored by ``aigid calibrate``, else 0.5."""
        return stored_threshold(self.config)

    # ---- checkpoints -----------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.named_parameters() if v.requires_grad}

    def save_pretrained(self, directory: Union[str, os.PathLike],
                        summary: Optional[dict[str, Any]] = None) -> None:
        """config.json (with HF-style ``model_type``/``architectures``/``id2label``) +
        model.safetensors (prompts and couplings only) + README.md (the model card; ``summary``:
        ``aigid train``'s, for its training data and metrics); a backbone without a named source
        of weights (random init) is saved beside them in backbone.safetensors."""
        os.makedirs(directory, exist_ok=True)
        config = asdict(self.config)
        if not self.backbone_has_weights:
            clip_state = {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}
            save_state_dict(os.path.join(directory, BACKBONE_FILE), clip_state)
            config["backbone"] = {**config["backbone"], "pretrained": None, "weights_file": BACKBONE_FILE}
        # save_state_dict, not save_file: the file gets the umask's mode, not safetensors' 0600
        save_state_dict(os.path.join(directory, WEIGHTS_FILE), self.trainable_state_dict())
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({**hf_fields("mirage"), **config}, f, indent=2)
        write_model_card(directory, self, summary)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], cache_dir: Optional[str] = None,
                        map_location: str = "cpu", download: bool = False) -> "MiraGe":
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            raw = drop_hf_fields(json.load(f), "mirage")  # folders with and without HF keys load alike
        backbone = dict(raw["backbone"])
        weights_file = backbone.pop("weights_file", None)
        raw["backbone"] = backbone
        model = cls(MiraGeConfig(**raw), cache_dir=cache_dir, download=download)
        if weights_file:
            model.clip.load_state_dict(load_file(os.path.join(directory, weights_file), device=map_location))
            model.backbone_has_weights = False
        state = load_file(os.path.join(directory, WEIGHTS_FILE), device=map_location)
        expected = set(model.trainable_state_dict())
        if set(state) != expected:
            raise ValueError(f"checkpoint tensors {sorted(set(state) ^ expected)} do not match this "
                             f"config's trainable tensors")
        model.load_state_dict(state, strict=False)
        return model
