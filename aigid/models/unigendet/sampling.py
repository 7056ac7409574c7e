"""Next-token choice for autoregressive decoding: repetition penalty, temperature, top-k, top-p
(Qwen2/BAGEL's generation defaults are temperature 0.7, top-p 0.8, top-k 20, penalty 1.05)."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["next_token"]


def next_token(logits: torch.Tensor, history: Sequence[int], greedy: bool, temperature: float,
                top_k: int, top_p: float, penalty: float, gen: torch.Generator) -> int:
    logits = logits.clone()
    if penalty != 1.0 and history:
        prev = torch.tensor(sorted(set(history)), dtype=torch.long)
        vals = logits[prev]
        logits[prev] = torch.where(vals > 0, vals / penalty, vals * penalty)
    if greedy:
        return int(logits.argmax())
    if temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
