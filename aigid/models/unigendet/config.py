"""UniGenDet's configuration: sizes of the MoT and SigLIP, the VAE, preprocessing, sampling."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Union

from aigid.models.unigendet.mot import MoTConfig
from aigid.models.unigendet.siglip import SigLIPConfig

__all__ = ["UniGenDetConfig"]


@dataclass
class UniGenDetConfig:
    llm: Union[str, dict[str, Any]]                 # MoTConfig.named name or its fields
    vit: dict[str, Any]                             # SigLIPConfig fields
    vae: dict[str, Any] = field(default_factory=lambda: {"path": None, "init": None})
    latent_patch_size: int = 2
    max_latent_size: int = 64                       # latent_pos_embed table side (tokens)
    vit_image_size: int = 504                       # pixels fed to SigLIP (multiple of its patch)
    vae_image_size: int = 512                       # pixels fed to the VAE (multiple of 8·patch)
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0                     # training shift (BAGEL: 1.0)
    sample_shift: float = 3.0
    sample_steps: int = 50
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    question: str = "Is this image real or fake?"
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "bytes"})
    preprocess: dict[str, Any] = field(default_factory=lambda: {
        "size": 512, "resize_mode": "shortest", "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    arch: str = "unigendet"

    @classmethod
    def named(cls, name: str) -> "UniGenDetConfig":
        """A shipped config: ``tiny`` or ``bagel-7b`` (aigid/models/configs/unigendet-*.json)."""
        path = resources.files("aigid.models") / "configs" / f"unigendet-{name}.json"
        if not path.is_file():
            raise ValueError(f"no shipped UniGenDet config {name!r} (tiny, bagel-7b)")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UniGenDetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown UniGenDet config fields {sorted(unknown)}")
        raw = dict(raw)
        if "cfg_interval" in raw:
            raw["cfg_interval"] = tuple(raw["cfg_interval"])
        return cls(**raw)

    def mot(self) -> MoTConfig:
        return MoTConfig.named(self.llm) if isinstance(self.llm, str) else MoTConfig(**self.llm)

    def siglip(self) -> SigLIPConfig:
        return SigLIPConfig(**self.vit)


