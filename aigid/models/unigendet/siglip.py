"""A SigLIP-style ViT with Hugging Face's SigLIP key names (BAGEL's understanding encoder).

Keys live under ``vision_model.*`` (UniGenDet nests this module as ``vit_model``):
``embeddings.patch_embedding`` (Conv2d), ``embeddings.position_embedding`` (Embedding over a
``side × side`` grid, ids ``row·side + col`` as BAGEL's extrapolating position ids),
``encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}``
and ``post_layernorm``. BAGEL-7B uses SigLIP so400m/14 with its last layer dropped (26 of 27),
image_size 980 (a 70 × 70 position table), gelu-tanh MLPs and no 2-D RoPE.

BAGEL's released checkpoints store ``patch_embedding`` as a Linear over patches flattened
channel-last ((p_h, p_w, c), BAGEL's ``patchify``); loading such a 2-D weight reshapes it into
the Conv2d here, so both layouts load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SigLIPConfig", "SigLIPVisionModel", "patch_weight_from_linear", "position_ids"]


@dataclass
class SigLIPConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    image_size: int = 980          # sets the position table: (image_size // patch_size)² entries
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size


def patch_weight_from_linear(w: torch.Tensor, conv_shape: Sequence[int], name: str = "patch_embedding") -> torch.Tensor:
    """BAGEL's Linear patch weight (D, p·p·C), channel-last, → the Conv2d weight (D, C, p, p)."""
    out, ch, p, _ = conv_shape
    if tuple(w.shape) != (out, p * p * ch):
        raise ValueError(f"{name}: Linear weight {tuple(w.shape)} does not fit Conv2d {tuple(conv_shape)}")
    return w.reshape(out, p, p, ch).permute(0, 3, 1, 2).contiguous()


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, c: SigLIPConfig):
        super().__init__()
        self.patch_size, self.side = c.patch_size, c.grid_side
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(self.side ** 2, c.hidden_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "patch_embedding.weight"
        w = state_dict.get(key)
        conv = self.patch_embedding.weight
        if w is not None and w.ndim == 2:  # BAGEL's Linear layout, channel-last
            state_dict[key] = patch_weight_from_linear(w, conv.shape, key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) → tokens (N, h·w, D) row-major, and their position ids (h·w,)."""
        x = self.patch_embedding(pixels)
        h, w = x.shape[-2:]
        if h > self.side or w > self.side:
            raise ValueError(f"a {h}x{w} patch grid exceeds the {self.side}x{self.side} position table")
        ids = position_ids(h, w, self.side, device=pixels.device)
        return x.flatten(2).transpose(1, 2) + self.position_embedding(ids), ids


def position_ids(h: int, w: int, side: int, device=None) -> torch.Tensor:
    """BAGEL's extrapolating flattened ids of an h × w grid inside a side × side table."""
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    return (rows * side + cols).flatten()


class SiglipAttention(nn.Module):
    def __init__(self, c: SigLIPConfig):
        super().__init__()
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not a multiple of num_heads {c.num_heads}")
        self.heads = c.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = (p(x).view(n, length, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)  # full attention within each image
        return self.out_proj(o.transpose(1, 2).reshape(n, length, d))


class SiglipMLP(nn.Module):
    def __init__(self, c: SigLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: SigLIPConfig):
        super().__init__()
        self.self_attn = SiglipAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, c: SigLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, c: SigLIPConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ids = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x), ids


class SigLIPVisionModel(nn.Module):
    """``forward(pixels (N, 3, H, W)) -> (tokens (N, h·w, D), position ids (h·w,))``."""

    def __init__(self, config: SigLIPConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.ndim != 4 or pixels.shape[1] != self.config.num_channels:
            raise ValueError(f"pixels must be (N, {self.config.num_channels}, H, W), got {tuple(pixels.shape)}")
        p = self.config.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the patch size {p}")
        return self.vision_model(pixels)
