"""Qwen2-style rotary position embedding over BAGEL's 1-D position ids, and RMSNorm.

RoPE: ``inv_freq_i = θ^(-2i/d)``; for position p the angles ``p·inv_freq`` are repeated twice
(``cat(freqs, freqs)``) and applied with ``rotate_half`` (the "half split" layout of Qwen2 /
LLaMA in Hugging Face, which is what BAGEL's checkpoints were trained with — not interleaved).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "rotate_half", "apply_rotary", "RMSNorm"]


class RotaryEmbedding(nn.Module):
    """Maps position ids (T,) to (cos, sin), each (T, head_dim), in the requested dtype."""

    def __init__(self, head_dim: int, theta: float = 1e6):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        # No buffer: BAGEL's checkpoints hold no rotary keys, and ``model.to(bf16)`` would round
        # a stored inv_freq; d/2 frequencies are recomputed in fp32 per forward instead.

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponent)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles: bf16 would lose whole radians at positions in the thousands.
        freqs = position_ids.to(torch.float32)[:, None] * self.inv_freq(position_ids.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, d); cos/sin: (T, d)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
