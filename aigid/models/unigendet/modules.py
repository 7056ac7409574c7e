"""UniGenDet's small modules, with BAGEL's names: fixed 2-D sin-cos position tables, the DiT
timestep embedder, the ViT→LLM MLP connector, latent (un)patchify, and the heads UniGenDet adds
(``fake_cls_head``, ``diga_mlp``, the unused ``latent_to_vit_connector``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sincos_2d", "PositionEmbedding", "TimestepEmbedder", "MLPConnector", "patchify_latents",
           "unpatchify_latents", "unigendet_heads"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """(side², dim) fixed table, row-major; as BAGEL/MAE, the first half encodes the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())], 1).float()


class PositionEmbedding(nn.Module):
    """Frozen 2-D sin-cos table ``pos_embed`` (a non-trainable parameter, as in the release)."""

    def __init__(self, side: int, hidden: int):
        super().__init__()
        self.side = side
        self.pos_embed = nn.Parameter(sincos_2d(hidden, side), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


class TimestepEmbedder(nn.Module):
    """DiT's: sinusoidal features of t (256, [cos; sin]) → Linear → SiLU → Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MLPConnector(nn.Module):
    def __init__(self, d_in: int, d_out: int, act: str):
        super().__init__()
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"unsupported connector activation {act!r}")
        self.approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


# latents <-> tokens ---------------------------------------------------------------------
def patchify_latents(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, h, w) → (N, (h/p)·(w/p), p·p·C), tokens row-major, features (p_h, p_w, C) as BAGEL."""
    n, c, h, w = latents.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the latent patch {p}")
    x = latents.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify_latents(tokens: torch.Tensor, grid: tuple[int, int], p: int, channels: int) -> torch.Tensor:
    n, (gh, gw) = tokens.shape[0], grid
    x = tokens.reshape(n, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, gh * p, gw * p)


def unigendet_heads(h: int, patch_dim: int) -> dict[str, nn.Module]:
    """The modules UniGenDet adds to BAGEL (``latent_to_vit_connector`` is unused, see module doc)."""
    return {"latent_to_vit_connector": nn.Sequential(nn.Linear(patch_dim, h), nn.GELU(), nn.Linear(h, h)),
            "fake_cls_head": nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h // 4), nn.ReLU(), nn.Linear(h // 4, 2)),
            "diga_mlp": nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))}
