"""Batches for bulk scanning: every image under some paths, preprocessed, on the device.

``iter_batches`` is what ``aigid.scan`` consumes. Each ``Batch`` carries the pixels of the images
decoded (with their ids, content hashes and sizes) and the items that failed (with a reason).
Every enumerated item that ``skip`` does not reject appears exactly once, in some batch's
``records`` or in some batch's ``errors``; order across workers is not preserved.

Decoders: ``"pil"`` (CPU workers, ``decode_cpu``) or ``"dali"`` (DALI decodes plain JPEGs, on the
GPU for a CUDA device, else on the CPU; PIL fallback; ``decode_dali``); ``"auto"`` takes DALI when
it is installed and the device is CUDA.
"""
from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.multiprocessing as mp

from aigid import backends
from aigid.data.decode_cpu import Chunk, Meta, ScanDataset, make_loader
from aigid.data.sources import IMAGE_EXTENSIONS
from aigid.data.transforms import eval_transform, is_variable_size

__all__ = ["Record", "Batch", "iter_batches", "choose_decoder"]

PathArg = Union[str, os.PathLike]


@dataclass
class Record:
    """One finished item: metadata of a decoded image, or an error (``error`` set)."""
    id: str
    hash: Optional[str]  # blake2b-128 of the bytes, when they could be read
    size: Optional[int]  # bytes
    error: Optional[str]
    evidence: Optional[str] = None  # provenance evidence (JSON text), when it was read


@dataclass
class Batch:
    records: list[Record]  # metadata of the decoded images, same order as ``pixels`` rows
    pixels: torch.Tensor | list[torch.Tensor]  # (n, 3, S, S) normalised, on the requested device
    # (n may be 0); a list of (3, H_i, W_i) when the preprocess keeps each image's aspect
    errors: list[Record]  # items of this batch that failed, in any order


def choose_decoder(decoder: str, device: torch.device) -> str:
    """``"dali"`` or ``"pil"`` for a requested decoder and device (raises on impossible asks)."""
    if decoder not in ("auto", "dali", "pil"):
        raise ValueError(f"decoder must be 'auto', 'dali' or 'pil', not {decoder!r}")
    if decoder == "dali" and not backends.has_dali():
        raise RuntimeError("decoder='dali' unavailable: nvidia-dali is not installed "
                           "(use decoder='pil' or 'auto')")
    if decoder == "auto":  # DALI on the CPU is no faster than the PIL workers (benchmarks/)
        return "dali" if backends.has_dali() and device.type == "cuda" else "pil"
    return decoder  # "dali" on a CPU device runs DALI's CPU pipeline


def _records(meta: list[Meta]) -> list[Record]:
    return [Record(m.id, m.hash, m.size, m.error, m.evidence) for m in meta]


def _check_skip(skip: Optional[Callable[[str], bool]], num_workers: int) -> None:
    if skip is None or num_workers == 0 or mp.get_start_method(allow_none=False) == "fork":
        return
    try:
        pickle.dumps(skip)
    except Exception as err:
        raise ValueError("with num_workers > 0 and the '{}' start method, skip must be picklable "
                         "(a module-level function or object): {}".format(
                             mp.get_start_method(), err)) from None


def iter_batches(paths: Sequence[PathArg] | PathArg, preprocess: dict[str, Any],
                 batch_size: int = 64, *, device: torch.device | str = "cpu",
                 decoder: str = "auto", num_workers: int = 0,
                 skip: Optional[Callable[[str], bool]] = None, prefetch: int = 2,
                 dtype: torch.dtype = torch.float32, dali_threads: int = 4,
                 recursive: bool = True,
                 extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS, sniff: bool = False,
                 not_images: Optional[Counter] = None, evidence: bool = False) -> Iterator[Batch]:
    """Yield ``Batch``es of up to ``batch_size`` decoded images for everything under ``paths``.

    ``skip(id)`` returning True leaves an item unread (resume). ``num_workers`` CPU processes read
    and decode (0: in this process); ``prefetch`` batches per worker (and, for DALI, decoded GPU
    batches) are prepared ahead, so decoding overlaps the caller's work on the current batch.
    ``sniff``: judge files by their first bytes instead of their extension. ``not_images``, if
    given, is filled (as batches arrive) with the files left out as not images, by extension.
    ``evidence``: read each file's provenance evidence in the workers (``Record.evidence``).
    Arguments are checked here, before the first batch is asked for.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    if batch_size < 1 or num_workers < 0 or prefetch < 1:
        raise ValueError("batch_size and prefetch must be >= 1 and num_workers >= 0")
    eval_transform(preprocess)  # a bad preprocess dict fails here, not inside a worker
    device = torch.device(device)
    if is_variable_size(preprocess) and decoder != "pil":
        if decoder == "dali":
            raise ValueError("decoder='dali' needs a fixed-size preprocess; this detector keeps each "
                             "image's aspect (resize_mode 'bagel'): use decoder='pil' or 'auto'")
        decoder = "pil"  # the DALI pipeline emits one size per batch
    choice = choose_decoder(decoder, device)
    _check_skip(skip, num_workers)

    gpu = None
    if choice == "dali":
        from aigid.data.decode_dali import DaliDecoder
        try:
            gpu = DaliDecoder(preprocess, batch_size, device, threads=dali_threads, dtype=dtype)
        except Exception as err:
            if decoder == "dali":
                raise
            warnings.warn(f"aigid: DALI is installed but failed to start ({type(err).__name__}: "
                          f"{err}); decoding with PIL", RuntimeWarning, stacklevel=2)
            choice = "pil"
    backends.announce("decode", choice)

    route = None
    if gpu is not None:
        from aigid.data.decode_dali import dali_eligible
        route = dali_eligible
    dataset = ScanDataset(list(paths), preprocess, batch_size, skip=skip, recursive=recursive,
                          extensions=extensions, dtype=dtype, route=route, sniff=sniff,
                          evidence=evidence)
    loader = make_loader(dataset, num_workers, prefetch, pin_memory=device.type == "cuda")
    if not_images is not None:
        loader = _tally(loader, not_images)
    if gpu is not None:
        return _dali_batches(loader, gpu, preprocess, device, dtype, prefetch)
    return _pil_batches(loader, device)


def _tally(chunks: Iterable[Chunk], not_images: Counter) -> Iterator[Chunk]:
    """Pass chunks on, adding up the non-image counts each worker sends back with them."""
    for chunk in chunks:
        not_images.update(chunk.skipped)
        yield chunk


def _pil_batches(loader: Iterable[Chunk], device: torch.device) -> Iterator[Batch]:
    for chunk in loader:
        pixels = chunk.pixels
        if isinstance(pixels, list):  # images of different sizes (an aspect-keeping preprocess)
            pixels = [p.to(device, non_blocking=True) for p in pixels]
        elif pixels.device != device:
            pixels = pixels.to(device, non_blocking=True)  # pinned by the loader on CUDA
        yield Batch(_records(chunk.meta), pixels, _records(chunk.errors))


def _dali_batches(loader: Iterable[Chunk], gpu: Callable, preprocess: dict[str, Any],
                  device: torch.device, dtype: torch.dtype, prefetch: int) -> Iterator[Batch]:
    from aigid.data.decode_dali import iter_dali

    for meta, pixels, errors in iter_dali(loader, gpu, preprocess, device, dtype, prefetch):
        yield Batch(_records(meta), pixels, _records(errors))
