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

Files left out as not images are counted by extension where enumeration filters them (no second
walk) and carried back in ``Chunk.skipped``: a file met while walking is counted by the worker
that would own it (the same CRC rule, since every worker walks everything), an archive member by
the archive's owner, so the sum over chunks counts each file once. With ``sniff=True`` a file's
content decides instead of its name: every file is a candidate, and one whose name is not an image
extension is scanned when its first bytes are an image signature, else counted as skipped.

With ``evidence=True`` each worker also reads the provenance evidence (``aigid.provenance``: C2PA,
IPTC XMP, generator metadata) from the bytes it already holds, before they are decoded here or
routed to the GPU decoder, and carries it as JSON text in ``Meta.evidence``.
"""
from __future__ import annotations

import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aigid.data.images import ImageError, load_rgb
from aigid.data.sources import (IMAGE_EXTENSIONS, SNIFF_BYTES, Archive, ItemError, content_hash,
                                image_format, iter_units, read_file, skip_key, stream_archive)
from aigid.data.dataset import stack_images
from aigid.data.transforms import Transform, eval_transform, is_variable_size
from aigid.provenance import evidence_json

__all__ = ["Meta", "Chunk", "ScanDataset", "decode_image", "make_loader"]

ERROR_FLUSH = 4  # flush a chunk once errors reach this many batches' worth (keeps progress flowing)


class Meta(NamedTuple):
    """What is known about one finished item (``error`` set when it could not be used)."""
    id: str
    hash: Optional[str]
    size: Optional[int]
    error: Optional[str]
    evidence: Optional[str] = None  # provenance evidence, JSON text, when it was read


@dataclass
class Chunk:
    """One worker's batch: decoded pixels with their metadata, encoded images, errors."""
    meta: list[Meta]  # rows of ``pixels``, same order
    pixels: torch.Tensor  # (n, 3, S, S) on CPU
    errors: list[Meta] = field(default_factory=list)
    encoded: list[tuple[Meta, bytes]] = field(default_factory=list)  # for the GPU decoder
    skipped: dict[str, int] = field(default_factory=dict)  # not images, by extension, since the
    # previous chunk of this worker

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
                 route: Optional[Callable[[bytes], bool]] = None, sniff: bool = False,
                 evidence: bool = False):
        super().__init__()
        self.paths, self.preprocess, self.batch_size = list(paths), dict(preprocess), batch_size
        self.skip, self.recursive, self.extensions = skip, recursive, extensions
        self.dtype, self.route, self.sniff, self.evidence = dtype, route, sniff, evidence
        self._claimed = (None if extensions is None else  # names that say "image"
                         frozenset(e.lower() if e.startswith(".") else "." + e.lower()
                                   for e in extensions))

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _skipped(self, ident: str) -> bool:
        return self.skip is not None and bool(self.skip(ident))

    def _named_image(self, name: str) -> bool:
        return self._claimed is None or os.path.splitext(name)[1].lower() in self._claimed

    def _not_image(self, name: str, data: Optional[bytes], counts: Counter) -> bool:
        """With sniff: whether a file whose name is no image extension holds no image either
        (then it is counted, not scanned). Files named as images are always scanned."""
        if not self.sniff or data is None or self._named_image(name):
            return False
        if image_format(data[:SNIFF_BYTES]) is not None:
            return False
        counts[skip_key(name)] += 1
        return True

    def samples(self, counts: Optional[Counter] = None
                ) -> Iterator[tuple[str, Optional[int], Optional[bytes], Optional[str]]]:
        """(id, size, bytes, error) for this worker's share, skipped ids left out unread; files
        left out as not images are added to ``counts`` by extension."""
        rank, world = self._shard()
        counts = Counter() if counts is None else counts

        def walked_past(path: str) -> None:  # every worker walks it: its owner counts it
            if world == 1 or _owner(path, world) == rank:
                counts[skip_key(path)] += 1

        def member_past(name: str) -> None:  # only the archive's owner streams it
            counts[skip_key(name)] += 1

        extensions = None if self.sniff else self.extensions  # sniff: the content decides
        units = iter_units(self.paths, recursive=self.recursive, extensions=extensions,
                           on_skip=walked_past)
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
                for got, data, reason in stream_archive(unit.id, extensions=extensions,
                                                        fetch=fetch, on_skip=member_past):
                    if isinstance(got, ItemError):
                        if not self._skipped(got.id):
                            yield got.id, None, None, reason
                    elif self._not_image(got.member, data, counts):
                        continue
                    elif data is not None or reason is not None:  # else: skipped, not read
                        yield got.id, got.size, data, reason
            elif not self._skipped(unit.id):
                if self._not_image(unit.id, _head(unit.source), counts):
                    continue  # judged by its first bytes: a big video is never read whole
                data, reason = read_file(unit.source, unit.size)
                yield unit.id, unit.size, data, reason

    def __iter__(self) -> Iterator[Chunk]:
        transform = eval_transform(self.preprocess)
        size = int(self.preprocess["size"])
        split = _split_normalise(transform, self.preprocess)
        row_dtype = self.dtype
        if split is not None:  # per image: geometry to uint8; per chunk: float + normalise
            transform, row_dtype = split[0], torch.uint8
        meta: list[Meta] = []
        rows: list[torch.Tensor] = []
        errors: list[Meta] = []
        encoded: list[tuple[Meta, bytes]] = []
        skipped: Counter = Counter()  # filled by samples() as it goes

        def flush() -> Chunk:
            if not rows:
                pixels = torch.empty(0, 3, size, size, dtype=self.dtype)
            elif split is None:
                pixels = stack_images(rows)
            else:  # rows are (H, W, 3) uint8: one size after the centre crop
                pixels = split[1](torch.stack(rows).permute(0, 3, 1, 2).contiguous()).to(self.dtype)
            chunk = Chunk(list(meta), pixels, list(errors), list(encoded), dict(skipped))
            skipped.clear()
            return chunk

        for ident, nbytes, data, reason in self.samples(skipped):
            if data is None:
                errors.append(Meta(ident, None, nbytes, reason or "unreadable"))
            else:
                digest, nbytes = content_hash(data), len(data)
                found = evidence_json(data) if self.evidence else None  # never raises
                if self.route is not None and self.route(data):
                    encoded.append((Meta(ident, digest, nbytes, None, found), data))
                else:
                    try:
                        rows.append(decode_image(data, transform, row_dtype))
                        meta.append(Meta(ident, digest, nbytes, None, found))
                    except ImageError as err:
                        errors.append(Meta(ident, digest, nbytes, str(err), found))
            if len(meta) + len(encoded) >= self.batch_size or \
                    len(errors) >= ERROR_FLUSH * self.batch_size:
                yield flush()
                meta, rows, errors, encoded = [], [], [], []
        if meta or errors or encoded or skipped:  # a worker that met only non-images reports too
            yield flush()


def _split_normalise(transform: Transform, preprocess: dict[str, Any]
                     ) -> Optional[tuple[Transform, Callable[[torch.Tensor], torch.Tensor]]]:
    """``eval_transform``'s Compose split in two for speed, or None when it has another shape:
    per image the geometry (resize, crop) to a uint8 (H, W, 3) tensor, per chunk the float
    conversion and normalisation on the stacked (N, 3, S, S) batch. The batch runs the same
    elementwise ops, so pixels are bit-identical to the per-image transform's; per-image torch
    calls were ~20% of the transform at small sizes (profiled on a CPU scan of 128 JPEGs)."""
    from torchvision.transforms import v2  # already loaded: eval_transform built ``transform``

    steps = getattr(transform, "transforms", None)
    if is_variable_size(preprocess) or not steps or len(steps) < 3:
        return None
    to_image, to_float, normalise = steps[-3:]
    if not (type(to_image) is v2.ToImage and type(to_float) is v2.ToDtype
            and type(normalise) is v2.Normalize and to_float.dtype == torch.float32
            and to_float.scale is True):
        return None
    geometry = v2.Compose(steps[:-3])

    def to_uint8(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(geometry(img), dtype=np.uint8, copy=True))

    return to_uint8, v2.Compose([to_float, normalise])


def _head(path: str) -> Optional[bytes]:
    """A file's first bytes, or None when it cannot be read (read_file then gives the reason)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(SNIFF_BYTES)
    except OSError:
        return None


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
