"""``predict`` and ``predict_iter`` over chunks: one loop both detectors share.

A detector supplies ``score_prepared(prep) -> (len(prep),) P(fake)`` for one chunk (NaN where an
item was left out); these turn the chunks of :func:`aigid.data.chunks.prepared_chunks` into one
tensor (``predict``) or a stream of floats in input order (``predict_iter``). Memory holds one
chunk being scored and the decoder's look-ahead, whatever the number of items.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Union

import torch

from aigid.data.transforms import Prepared

Scorer = Callable[[Prepared], torch.Tensor]


def default_batch_size(device: torch.device, cuda: int, cpu: int) -> int:
    """Items per forward: large enough to fill a GPU, small enough that a CPU's chunk stays in cache."""
    return cuda if device.type == "cuda" else cpu


def collect(chunks: Iterator[Prepared], score: Scorer, return_errors: bool
            ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[int, str]]]:
    """Every chunk scored, concatenated in input order; ``{index: reason}`` of the skipped ones."""
    parts: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    for prep in chunks:
        parts.append(score(prep))
        errors.update({prep.offset + i: reason for i, reason in prep.errors.items()})
    if not parts:
        raise ValueError("no images given")
    scores = torch.cat(parts)
    return (scores, errors) if return_errors else scores


def stream(chunks: Iterator[Prepared], score: Scorer, return_errors: bool
           ) -> Iterator[Union[float, tuple[float, Optional[str]]]]:
    """P(fake) per item as each chunk finishes; ``(score, reason or None)`` with ``return_errors``."""
    for prep in chunks:
        for i, value in enumerate(score(prep).tolist()):
            yield (value, prep.errors.get(i)) if return_errors else value
