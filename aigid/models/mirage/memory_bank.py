"""FIFO memory bank of past (detached) embeddings and their labels (MoCo-style queue)."""
from __future__ import annotations

import torch
from torch import nn


class MemoryBank(nn.Module):
    """Holds up to ``size`` past embeddings; the oldest are overwritten first.

    The bank is training state, not a model weight: its buffers are not saved in checkpoints.
    ``view()`` returns the filled part in insertion order (oldest first).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise ValueError(f"bank size must be ≥ 0, got {size}")
        self.size = size
        self.register_buffer("feats", torch.zeros(size, dim), persistent=False)
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long), persistent=False)
        self.filled = 0
        self.head = 0  # next slot to write

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.filled < self.size:
            return self.feats[: self.filled], self.labels[: self.filled]
        order = torch.arange(self.head, self.head + self.size, device=self.feats.device) % self.size
        return self.feats[order], self.labels[order]

    @torch.no_grad()
    def push(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        if self.size == 0:
            return
        feats, labels = feats.detach()[-self.size:], labels.detach()[-self.size:]
        slots = (self.head + torch.arange(feats.shape[0], device=self.feats.device)) % self.size
        self.feats[slots] = feats.to(self.feats.dtype)
        self.labels[slots] = labels.to(self.labels.device)
        self.head = int((self.head + feats.shape[0]) % self.size)
        self.filled = min(self.size, self.filled + feats.shape[0])

    def reset(self) -> None:
        self.filled = self.head = 0
