"""What ``predict`` takes, prepared in chunks: memory stays flat in the number of items.

``prepare`` decodes a whole list before the model sees any of it (≈ 3 MB of pixels per 224² image
at every stage of a batch), so 10,000 paths exhaust a 24 GB machine. ``prepared_chunks`` walks any
list or iterable lazily and yields one :class:`~aigid.data.transforms.Prepared` per
``batch_size`` items, decoded by the same path as ``prepare`` and the scan (``load_rgb`` + the
detector's transform) — on ``workers`` threads beside the caller (PIL and torch release the GIL
while they decode and resize), at most two chunks ahead, so the model never waits on decoding it
could have overlapped and nothing piles up when it is the slower side.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from aigid.data.images import ImageError, InputError, describe
from aigid.data.transforms import Errors, ImageInput, Prepared, Transform, check_pixels, is_single, item_pixels

log = logging.getLogger("aigid.data.transforms")  # the same notices as prepare's

DEFAULT_DECODE_WORKERS = 2
LOOKAHEAD_CHUNKS = 2


def default_decode_workers() -> int:
    """Decode threads beside the model: two, or one on a single-core machine."""
    return max(1, min(DEFAULT_DECODE_WORKERS, os.cpu_count() or 1))


def iter_items(images: ImageInput) -> Iterator[Any]:
    """The items of one image, a (N, ...) uint8 batch, or any list/iterable of images, lazily."""
    if is_single(images):
        return iter([images])
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 4:
            return iter(images)
        raise InputError(f"expected one image or a batch of them, got an array of shape {tuple(images.shape)}")
    try:
        return iter(images)
    except TypeError:  # one item of a kind we do not take: its own error names it
        return iter([images])


def _decode(item: Any, transform: Transform) -> tuple[Optional[torch.Tensor], Optional[str]]:
    try:
        return item_pixels(item, transform), None
    except ImageError as err:
        return None, err.reason if isinstance(err, InputError) else str(err)


def _chunk(offset: int, items: list, results: Iterable[tuple[Optional[torch.Tensor], Optional[str]]],
           errors: Errors) -> Prepared:
    pixels, kept, failed = [], [], {}
    for i, (item, (px, reason)) in enumerate(zip(items, results)):
        if reason is None:
            pixels.append(px)
            kept.append(i)
        elif errors == "raise":
            raise InputError(reason, offset + i, describe(item))
        else:
            log.warning("aigid: skipped item %d (%s): %s", offset + i, describe(item), reason)
            failed[i] = reason
    return Prepared(pixels, kept, failed, len(items), offset)


def _float_batches(batch: torch.Tensor, batch_size: int) -> Iterator[Prepared]:
    check_pixels(batch)
    batch = batch if batch.ndim == 4 else batch[None]
    for start in range(0, len(batch), batch_size):
        part = batch[start:start + batch_size]
        yield Prepared(part, list(range(len(part))), {}, len(part), start)


def prepared_chunks(images: ImageInput, transform: Transform, batch_size: int, *,
                    errors: Errors = "raise", workers: Optional[int] = None) -> Iterator[Prepared]:
    """``images`` (as ``prepare`` takes them, or any iterable of items) → one ``Prepared`` per
    ``batch_size`` items, in order; ``Prepared.offset`` is its first item's index in the input.

    ``workers``: decode threads (default :func:`default_decode_workers`; 0 decodes in the caller's
    thread). ``errors``: as ``prepare`` — ``"raise"`` raises ``InputError`` naming the item's
    index in the whole input when the chunk holding it is reached; ``"skip"`` leaves it out of
    its chunk (the reason in ``Prepared.errors``, a warning logged). A float tensor is taken as
    preprocessed pixels and sliced, never copied."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        yield from _float_batches(images, batch_size)
        return
    items = iter_items(images)
    workers = default_decode_workers() if workers is None else workers
    if workers == 0:
        for offset in itertools.count(0, batch_size):
            part = list(itertools.islice(items, batch_size))
            if not part:
                return
            yield _chunk(offset, part, (_decode(it, transform) for it in part), errors)
    with ThreadPoolExecutor(workers, thread_name_prefix="aigid-decode") as pool:
        pending: deque[tuple[int, list, list[Future]]] = deque()
        offset = 0

        def submit_next() -> bool:
            nonlocal offset
            part = list(itertools.islice(items, batch_size))
            if not part:
                return False
            pending.append((offset, part, [pool.submit(_decode, it, transform) for it in part]))
            offset += len(part)
            return True

        for _ in range(LOOKAHEAD_CHUNKS):
            if not submit_next():
                break
        try:
            while pending:
                start, part, futures = pending.popleft()
                chunk = _chunk(start, part, (f.result() for f in futures), errors)
                submit_next()
                yield chunk
        finally:  # an early stop (an error, a closed generator) drops what is still queued
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()
