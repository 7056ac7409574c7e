"""The CPU decode path: read, hash, decode with PIL and preprocess, in DataLoader workers.

``ScanDataset`` is an ``IterableDataset`` over the units of ``sources.iter_units``. Every worker
enumerates the same deterministic unit sequence and keeps its share, so together they cover every
unit exactly once with no coordination: archive number ``k`` goes wholly to worker
``k % num_workers`` (round-robin balances a folder of big shards; the owner streams it once), and
a file or enumeration error goes to the worker picked by a CRC of its id (spreads evenly, and a
file created or deleted mid-scan cannot shift the others between workers, so none is lost or
counted twice).

Workers already group their output into ``Chunk``s of up to ``batch_size`` usable images (plus the
errors met on the way), so the DataLoader runs with ``batch_size=None`` and what reaches the GPU
is full batches. With a ``route`` predicate (the DALI path), images it accepts are passed on
encoded instead of being decoded here.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aigid.data.images import ImageError, load_rgb
from aigid.data.sources import (IMAGE_EXTENSIONS, Archive, ItemError, content_hash, iter_units,
                                read_file, stream_archive)
from aigid.data.dataset import stack_images
from aigid.data.transforms import Transform, eval_transform

__all__ = ["Meta", "Chunk", "ScanDataset", "decode_image", "make_loader"]

ERROR_FLUSH = 4  # flush a chunk once errors reach this many batches' worth (keeps progress flowing)


class Meta(NamedTuple):
    """What is known about one finished item (``error`` set when it could not be used)."""
    id: str
    hash: Optional[str]
    size: Optional[int]
    error: Optional[str]


@dataclass
class Chunk:
    """One worker's batch: decoded pixels with their metadata, encoded images, errors."""
    meta: list[Meta]  # rows of ``pixels``, same order
    pixels: torch.Tensor  # (n, 3, S, S) on CPU
    errors: list[Meta] = field(default_factory=list)
    encoded: list[tuple[Meta, bytes]] = field(default_factory=list)  # for the GPU decoder

    def pin_memory(self) -> "Chunk":  # called by the DataLoader's pin-memory thread
        self.pixels = ([p.pin_memory() for p in self.pixels] if isinstance(self.pixels, list)
                       else self.pixels.pin_memory())
        return self


def _owner(ident: str, world: int) -> int:
    return zlib.crc32(ident.encode("utf-8", "surrogateescape")) % world


def decode_image(data: bytes, transform: Transform, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
    """Encoded bytes -> preprocessed (3, S, S) tensor; raise ``ImageError`` with a reason."""
    try:
        pixels = transform(load_rgb(data))
    except ImageError:
        raise
    except Exception as err:  # a malformed file can make PIL raise almost anything
        raise ImageError(f"cannot decode: {type(err).__name__}: {err}") from None
    return pixels.to(dtype)


class ScanDataset(IterableDataset):
    """Yields ``Chunk``s for everything under ``paths``; see the module docstring."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: dict[str, Any],
                 batch_size: int, *, skip: Optional[Callable[[str], bool]] = None,
                 recursive: bool = True, extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS,
                 dtype: torch.dtype = torch.float32,
                 route: Optional[Callable[[bytes], bool]] = None):
        super().__init__()
        self.paths, self.preprocess, self.batch_size = list(paths), dict(preprocess), batch_size
        self.skip, self.recursive, self.extensions = skip, recursive, extensions
        self.dtype, self.route = dtype, route

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _skipped(self, ident: str) -> bool:
        return self.skip is not None and bool(self.skip(ident))

    def samples(self) -> Iterator[tuple[str, Optional[int], Optional[bytes], Optional[str]]]:
        """(id, size, bytes, error) for this worker's share, skipped ids left out unread."""
        rank, world = self._shard()
        units = iter_units(self.paths, recursive=self.recursive, extensions=self.extensions)
        archives = 0
        for unit in units:
            if isinstance(unit, Archive):
                archives += 1
                if (archives - 1) % world != rank:
                    continue
            elif world > 1 and _owner(unit.id, world) != rank:
                continue
            if isinstance(unit, ItemError):
                if not self._skipped(unit.id):
                    yield unit.id, None, None, unit.reason
            elif isinstance(unit, Archive):
                fetch = lambda item: not self._skipped(item.id)  # noqa: E731
                for got, data, reason in stream_archive(unit.id, extensions=self.extensions,
                                                        fetch=fetch):
                    if isinstance(got, ItemError):
                        if not self._skipped(got.id):
                            yield got.id, None, None, reason
                    elif data is not None or reason is not None:  # else: skipped, not read
                        yield got.id, got.size, data, reason
            elif not self._skipped(unit.id):
                data, reason = read_file(unit.source, unit.size)
                yield unit.id, unit.size, data, reason

    def __iter__(self) -> Iterator[Chunk]:
        transform = eval_transform(self.preprocess)
        size = int(self.preprocess["size"])
        meta: list[Meta] = []
        rows: list[torch.Tensor] = []
        errors: list[Meta] = []
        encoded: list[tuple[Meta, bytes]] = []

        def flush() -> Chunk:
            pixels = (stack_images(rows) if rows
                      else torch.empty(0, 3, size, size, dtype=self.dtype))
            return Chunk(list(meta), pixels, list(errors), list(encoded))

        for ident, nbytes, data, reason in self.samples():
            if data is None:
                errors.append(Meta(ident, None, nbytes, reason or "unreadable"))
            else:
                digest, nbytes = content_hash(data), len(data)
                if self.route is not None and self.route(data):
                    encoded.append((Meta(ident, digest, nbytes, None), data))
                else:
                    try:
                        rows.append(decode_image(data, transform, self.dtype))
                        meta.append(Meta(ident, digest, nbytes, None))
                    except ImageError as err:
                        errors.append(Meta(ident, digest, nbytes, str(err)))
            if len(meta) + len(encoded) >= self.batch_size or \
                    len(errors) >= ERROR_FLUSH * self.batch_size:
                yield flush()
                meta, rows, errors, encoded = [], [], [], []
        if meta or errors or encoded:
            yield flush()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are the parallelism; intra-op threads would oversubscribe


def make_loader(dataset: ScanDataset, num_workers: int = 0, prefetch: int = 2,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding the dataset's ``Chunk``s as they are (no re-batching)."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"prefetch_factor": max(1, prefetch), "worker_init_fn": _worker_init}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=_identity, **extra)


def _identity(x: Any) -> Any:
    return x
