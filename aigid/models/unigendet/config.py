"""UniGenDet's configuration: sizes of the MoT and SigLIP, the VAE, preprocessing, sampling.

Defaults follow the public UniGenDet/BAGEL code (``shared/papers/unigendet-upstream-notes.md``):
images keep their aspect (VAE image by ``ImageTransform(1024, 512, 16)``, the ViT image by
``ImageTransform(980, 224, 14)`` of that result), the VAE posterior is sampled, the question is
FakeClue's training question, and the generated answer's wording is parsed as the public
``eval/det/fakevlm_test.py`` does when ``verdict="text"``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from aigid.models.card import drop_hf_fields
from aigid.models.configs import shipped_config
from aigid.models.unigendet.mot import MoTConfig
from aigid.models.unigendet.siglip import SigLIPConfig

__all__ = ["UniGenDetConfig", "FAKECLUE_QUESTION", "FAKEVLM_EVAL_HINT", "GENERATION_PRESETS"]

log = logging.getLogger(__name__)

# FakeClue's training question, verbatim (the public training data's ``conversations[0]``).
FAKECLUE_QUESTION = "Does the image looks real/fake?"
# What the public evaluation script (eval/det/fakevlm_test.py) appends to that question before
# generating the answer whose wording gives the paper's accuracy.
FAKEVLM_EVAL_HINT = (
    "\nExample Output Format:\n"
    "        For a real image: \"This is a real image. [Explanation summarizing common realistic "
    "features, such as clear outlines, organized objects, realistic shadows, and aligned roads.]\"\n"
    "        For a fake image: \"This is a fake image. [Explanation summarizing common unrealistic "
    "features, such as blurry outlines, disorganized objects, unrealistic shadows, and misaligned "
    "roads.]\"\n")
# Sampler presets: today's default (BAGEL's inferencer: CFG on t in [0.4, 1]) and the paper's FID
# setting (1024², text CFG over the whole schedule).
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"size": None, "cfg_interval": None},
    "paper-fid": {"size": 1024, "cfg_interval": (0.0, 1.0)},
}
_LEGACY_FIELDS = ("vit_image_size",)  # fixed square ViT size before images kept their aspect


@dataclass
class UniGenDetConfig:
    llm: Union[str, dict[str, Any]]                 # MoTConfig.named name or its fields
    vit: dict[str, Any]                             # SigLIPConfig fields
    vae: dict[str, Any] = field(default_factory=lambda: {"path": None, "init": None})
    latent_patch_size: int = 2
    max_latent_size: int = 64                       # latent_pos_embed table side (tokens)
    vae_image_size: int = 512                       # default side of generated images (pixels)
    # BAGEL's ViT resize, applied to the VAE-sized image (ImageTransform(980, 224, 14)).
    vit_resize: dict[str, int] = field(default_factory=lambda: {"max_size": 980, "min_size": 224, "stride": 14})
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0                     # training shift (BAGEL: 1.0)
    sample_shift: float = 3.0
    sample_steps: int = 50
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    question: str = FAKECLUE_QUESTION
    answer_format_hint: str = FAKEVLM_EVAL_HINT     # appended to the question for verdict="text"
    verdict: str = "head"                           # "head" (fake_cls_head) or "text" (parsed answer)
    text_max_new_tokens: int = 1000                 # answer budget for verdict="text" (inferencer's default)
    latent_sample: bool = True                      # sample the VAE posterior (BAGEL) or take its mode
    latent_seed: int = 0                            # per-image seed of that sample
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "bytes"})
    # The VAE image: BAGEL's ImageTransform(1024, 512, 16) — aspect kept, no crop, bicubic.
    preprocess: dict[str, Any] = field(default_factory=lambda: {
        "size": 512, "max_size": 1024, "stride": 16, "resize_mode": "bagel", "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    # aigid.models.calibration.Calibration.to_dict() (``aigid calibrate``): calibrates verdict="head"
    # scores (never the text verdict's 1/0) and holds the stored threshold; None = raw, 0.5.
    calibration: Optional[dict[str, Any]] = None
    arch: str = "unigendet"

    @classmethod
    def named(cls, name: str) -> "UniGenDetConfig":
        """A shipped config: ``tiny`` or ``bagel-7b`` (aigid/models/configs/unigendet-*.json)."""
        return cls.from_dict(shipped_config("unigendet", name))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UniGenDetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        raw = drop_hf_fields(raw, "unigendet")  # config.json's HF-style keys are not ours to keep
        for name in _LEGACY_FIELDS:
            if name in raw:
                log.info("UniGenDet config: ignoring legacy field %r (each image now keeps its aspect; "
                         "see vit_resize)", name)
                raw.pop(name)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown UniGenDet config fields {sorted(unknown)}")
        if "cfg_interval" in raw:
            raw["cfg_interval"] = tuple(raw["cfg_interval"])
        if raw.get("verdict", "head") not in ("head", "text"):
            raise ValueError(f"verdict must be 'head' or 'text', got {raw['verdict']!r}")
        return cls(**raw)

    def mot(self) -> MoTConfig:
        return MoTConfig.named(self.llm) if isinstance(self.llm, str) else MoTConfig(**self.llm)

    def siglip(self) -> SigLIPConfig:
        return SigLIPConfig(**self.vit)


