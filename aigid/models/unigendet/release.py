"""Loading BAGEL / UniGenDet release folders, and building the external VAE.

A release folder holds ``ema.safetensors`` (BAGEL's key names, which our modules mirror) and
optionally ``llm_config.json`` / ``vit_config.json`` (Qwen2 and SigLIP sizes). The VAE is a
diffusers ``AutoencoderKL`` (the FLUX AE converted to diffusers' layout) from a local folder, or a
seeded random one for tests.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from aigid.models.unigendet.config import UniGenDetConfig
from aigid.models.unigendet.mot import MoTConfig
from aigid.models.unigendet.siglip import patch_weight_from_linear

if TYPE_CHECKING:
    from aigid.models.unigendet.model import UniGenDet

__all__ = ["release_config", "release_to_ours", "has_vae", "build_vae"]


def release_config(directory: str) -> UniGenDetConfig:
    """bagel-7b, overridden by the release's Qwen2 / SigLIP configs (BAGEL drops SigLIP's last layer)."""
    config = UniGenDetConfig.named("bagel-7b")
    llm, vit = os.path.join(directory, "llm_config.json"), os.path.join(directory, "vit_config.json")
    if os.path.isfile(llm):
        with open(llm) as f:
            config.llm = MoTConfig.from_qwen2(json.load(f)).to_dict()
    if os.path.isfile(vit):
        with open(vit) as f:
            v = json.load(f)
        config.vit = {"hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
                      "num_layers": v["num_hidden_layers"] - 1, "num_heads": v["num_attention_heads"],
                      "image_size": v.get("image_size", 980), "patch_size": v.get("patch_size", 14),
                      "layer_norm_eps": v.get("layer_norm_eps", 1e-6)}
    if config.tokenizer.get("kind") == "qwen2" and not config.tokenizer.get("path"):
        config.tokenizer = {**config.tokenizer, "path": directory}
    return config


def release_to_ours(state: dict[str, torch.Tensor], model: "UniGenDet") -> dict[str, torch.Tensor]:
    """BAGEL stores SigLIP's patch embedding as a Linear over channel-last patches: make it a conv."""
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    w, conv = state.get(key), model.vit_model.vision_model.embeddings.patch_embedding.weight
    if w is not None and w.ndim == 2:
        state = {**state, key: patch_weight_from_linear(w, conv.shape, key)}
    return state


def has_vae(spec: dict[str, Any], built: Optional[nn.Module]) -> bool:
    return built is not None or bool(spec.get("path")) or bool(spec.get("init"))


def build_vae(spec: dict[str, Any]) -> nn.Module:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("UniGenDet's VAE needs diffusers: pip install diffusers") from e
    if spec.get("path"):
        vae = AutoencoderKL.from_pretrained(spec["path"], local_files_only=True)
    elif spec.get("init"):
        init = dict(spec["init"])
        blocks = len(init.get("block_out_channels", [])) or 4
        if 2 ** (blocks - 1) != int(spec.get("downsample", 8)):
            raise ValueError(f"vae.init has {blocks} blocks (×{2 ** (blocks - 1)} down), "
                             f"config says ×{spec.get('downsample')}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.get("seed", 0)))
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=int(spec.get("channels", 16)),
                                down_block_types=["DownEncoderBlock2D"] * blocks,
                                up_block_types=["UpDecoderBlock2D"] * blocks,
                                use_quant_conv=False, use_post_quant_conv=False, **init)
    else:
        raise RuntimeError("no VAE configured: set config.vae['path'] to a local diffusers AutoencoderKL "
                           "folder (FLUX AE), or pass latents directly")
    return vae.eval().requires_grad_(False)
