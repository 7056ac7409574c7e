"""Bulk scanning: every image under some paths in, one P(fake) per image out, into a store.

    for r in aigid.scan(["photos/", "shard-000.tar"], detector, out="results.sqlite"):
        print(r.id, r.score, r.error)

The pipeline has three stages that overlap: the data path (``aigid.data.batches``: enumeration,
reading, hashing, decoding in worker processes, prefetched, pinned and copied to the device), the
model (one scoring thread: ``detector.predict`` under ``torch.inference_mode`` and, on CUDA, bf16
autocast), and this generator (writes each finished batch to the store, then yields it). The model
runs batch k while the main thread fetches batch k+1 and commits batch k-1, so neither the
``.cpu()`` inside ``predict`` nor a SQLite commit stalls the data path.

The store (``out=``, off by default) is ``aigid.scanning.store.ResultStore``: the scan holds its writer
lock from start to end (a second scan into the same file is refused with ``StoreLockedError``),
refuses a file that is not an aigid results file without touching it, and checkpoints the WAL at
the end, so the ``.sqlite`` alone then holds every row (while a scan runs, or after a kill, the
``-wal`` beside it holds the latest batches: copy both). Stored labels follow the threshold in
force: the latest run's, so a rescan with a new ``threshold`` relabels without rescoring.

Durability: each batch (its scores and its errors) is one SQLite transaction, committed before its
results are yielded; ``resume=True`` skips ids already stored for this detector (errors included
unless ``retry_errors``), so a killed scan restarted with the same arguments finishes the job with
nothing lost and nothing counted twice. The detector is identified by ``model_id``: a fingerprint
of its architecture, config and weights, so another detector (or other weights) does not skip.

Provenance (``evidence=True``, the default): the decode workers read what each file declares
about its origin (C2PA manifest, IPTC ``DigitalSourceType``, generator metadata;
``aigid.provenance``) from the bytes they already hold; it rides along as ``ScanResult.evidence``
and the store's ``evidence`` column. It never changes a score; the summary counts the images
that declared AI (``declared_ai``) and those of them the detector labelled real
(``declared_ai_missed``).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.context
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from aigid.data.transforms import is_variable_size
from aigid.models.precision import precision_of
from aigid.provenance import DECLARED_AI, DECLARED_CAMERA, provenance_of
from aigid.scanning.fingerprint import config_dict, model_id  # noqa: F401  (model_id: part of scan's API)
from aigid.scanning.store import DoneFilter, ResultRow, ResultStore, check_threshold, label_of

__all__ = ["ScanResult", "scan", "scan_to_store", "model_id", "default_workers"]

PathArg = Union[str, os.PathLike]


@dataclass
class ScanResult:
    """One item: a score and label, or an error with its reason (then score/label are None)."""
    id: str
    hash: Optional[str]
    size: Optional[int]
    score: Optional[float]
    label: Optional[int]
    error: Optional[str]
    evidence: Optional[str] = None  # what the file declares about its origin (JSON text)


# --------------------------------------------------------------------------- detector identity


def _device_of(detector) -> torch.device:
    dev = getattr(detector, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(detector.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def default_workers(device: torch.device) -> int:
    """Decode processes: on CUDA all cores but one (decoding is the bottleneck); on CPU the model
    needs the cores too, so a few workers on big machines and none on small ones."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 4)


# --------------------------------------------------------------------------- skip counting


class _CountingSkip:
    """The resume filter, counting hits per process in shared memory (one slot per DataLoader
    worker, so there are no races) so the summary can say how many items were skipped."""

    def __init__(self, done: DoneFilter, slots: int):
        self.done = done
        self.counts = mp.RawArray(ctypes.c_int64, slots)

    def __call__(self, ident: str) -> bool:
        hit = self.done(ident)
        if hit and self.counts is not None:
            info = torch.utils.data.get_worker_info()
            self.counts[0 if info is None else info.id + 1] += 1
        return hit

    def __getstate__(self) -> dict:
        # Shared memory travels only to processes being started (DataLoader workers); any other
        # pickling (a picklability check, Ray) gets a filter that does not count.
        spawning = multiprocessing.context.get_spawning_popen() is not None
        return {"done": self.done, "counts": self.counts if spawning else None}

    def total(self) -> int:
        return int(sum(self.counts)) if self.counts is not None else 0


# --------------------------------------------------------------------------- the scanner


NO_VERDICT = "no verdict: the generated answer says neither real nor fake"


def _predict(detector, pixels: torch.Tensor, autocast: bool) -> torch.Tensor:
    # Runs in the scoring thread: inference and autocast modes are thread-local, so set them here.
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        scores = detector.predict(pixels)
    return torch.as_tensor(scores).detach().float().reshape(-1).cpu()


def scan(paths: Union[PathArg, Sequence[PathArg]], detector, *,
         out: Optional[PathArg] = None, batch_size: int = 64,
         device: Optional[Union[str, torch.device]] = None, decoder: str = "auto",
         num_workers: Optional[int] = None, resume: bool = True, retry_errors: bool = False,
         threshold: Optional[float] = None, export: Optional[PathArg] = None, progress: bool = True,
         model: Optional[str] = None, stats: Optional[dict[str, Any]] = None,
         sniff: bool = False, evidence: bool = True) -> Iterator[ScanResult]:
    """Score every image under ``paths``; yield a ``ScanResult`` per item as batches finish.

    ``paths``: folders (walked), image files, tar/zip shards, ``.txt``/``.lst`` lists.
    ``out``: the SQLite results file to write and resume from (default ``None``: no store, no
    resume, nothing written: results are only yielded).
    ``device``: moves the detector there (default: where it already is). ``decoder``: ``"auto"``,
    ``"dali"`` or ``"pil"``. ``num_workers``: decode processes (default ``default_workers``).
    ``label`` is ``score > threshold`` (a probability in [0, 1]; a score equal to it is real; default:
    the detector's stored threshold from ``aigid calibrate``, else 0.5); in
    the store it becomes the threshold in force for this model, also for rows skipped as done.
    ``export``: after the scan, write this model's results to a .jsonl/.csv/.parquet file.
    ``model``: the id results are stored under (default ``model_id(detector)``). ``stats``, if
    given, is filled with the run's summary at the end.
    The summary's ``skipped_not_image`` counts the files left out as not images, by extension.
    ``sniff``: identify images by their first bytes whatever their name (a JPEG named ``.dat``, a
    PNG with no extension); without it, the extension list decides.
    ``evidence``: read each file's provenance evidence (``ScanResult.evidence``, JSON text; see
    ``aigid.provenance``); the summary's ``declared_ai`` counts the scored images that declared
    AI, ``declared_ai_missed`` those of them labelled real, ``declared_camera`` capture claims.
    Items are yielded in completion order, not enumeration order.
    """
    from aigid.data.batches import choose_decoder, iter_batches

    paths = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("scan: no paths given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if export is not None and out is None:
        raise ValueError("export= needs a results store (out=...) to export from")
    if threshold is None:  # the detector's stored threshold (``aigid calibrate``), else 0.5
        threshold = float(getattr(detector, "threshold", 0.5))
    threshold = check_threshold(threshold)
    preprocess = getattr(getattr(detector, "config", None), "preprocess", None)
    if not isinstance(preprocess, dict):
        raise TypeError("scan needs a detector with config.preprocess (a dict) and predict(pixels)")
    if device is not None and torch.device(device) != _device_of(detector):
        detector.to(device)
    dev = _device_of(detector)
    if hasattr(detector, "eval"):
        detector.eval()
    check_ready = getattr(detector, "check_ready", None)
    if check_ready is not None:  # e.g. a UniGenDet base without its detection head: fail before reading
        check_ready()
    workers = default_workers(dev) if num_workers is None else num_workers
    if decoder == "auto" and is_variable_size(preprocess):
        decoder = "pil"  # DALI's pipeline emits one size per batch; this detector keeps each aspect
    chosen = choose_decoder(decoder, dev)

    # Held until the end: the writer lock, so no other scan writes this file meanwhile.
    store = ResultStore(out) if out is not None else None
    mid, skip, run = model, None, None
    try:
        if store is not None:
            mid = mid or model_id(detector)
            if resume:
                skip = _CountingSkip(store.done_filter(mid, include_errors=not retry_errors),
                                     workers + 1)
            # the precision it computes in beside its config: scores differ slightly between them
            ran_as = {**config_dict(detector), "precision": precision_of(detector),
                      "precision_why": getattr(detector, "precision_why", None)}
            run = store.start_run(mid, detector=ran_as, preprocess=preprocess,
                                  threshold=threshold, decoder=chosen, paths=paths)
    except BaseException:
        store.close()
        raise

    counts = {"scored": 0, "errors": 0}
    declared = {"declared_ai": 0, "declared_ai_missed": 0, "declared_camera": 0}
    not_images: Counter = Counter()  # filled as batches arrive, from every worker
    bar = tqdm(desc="scan", unit="img", disable=not progress, dynamic_ncols=True)
    # OpenMP's thread count is per thread: give the scoring thread the caller's setting.
    pool = ThreadPoolExecutor(1, thread_name_prefix="aigid-score",
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
    autocast = dev.type == "cuda"
    started = time.perf_counter()
    finished = False
    batches = None

    def finish(batch, future: Optional[Future]) -> list[ScanResult]:
        scores = future.result() if future is not None else torch.empty(0)
        if scores.numel() != len(batch.records):
            raise RuntimeError(f"detector returned {scores.numel()} scores for "
                               f"{len(batch.records)} images")
        now = time.time()
        # NaN: a text verdict whose answer names neither class — stored as an error with its reason.
        results = [ScanResult(r.id, r.hash, r.size, s, label_of(s, threshold), None, r.evidence)
                   if s == s else
                   ScanResult(r.id, r.hash, r.size, None, None, NO_VERDICT, r.evidence)
                   for r, s in zip(batch.records, scores.tolist())]
        results += [ScanResult(r.id, r.hash, r.size, None, None, r.error or "unreadable",
                               r.evidence) for r in batch.errors]
        if store is not None:  # one transaction per batch: all of it or none of it
            store.write(ResultRow(x.id, mid, x.hash, x.size, x.score, None, x.error, now, run,
                                  x.evidence)
                        for x in results)  # the label is derived on read, not stored
        if evidence:
            _count_declared(results, declared)
        counts["scored"] += len(batch.records)
        counts["errors"] += len(batch.errors)
        bar.update(len(results))
        if batch.errors:
            bar.set_postfix(errors=counts["errors"], refresh=False)
        return results

    try:
        batches = iter_batches(paths, preprocess, batch_size, device=dev, decoder=chosen,
                               num_workers=workers, skip=skip, sniff=sniff, not_images=not_images,
                               evidence=evidence)
        pending = None
        for batch in batches:
            future = pool.submit(_predict, detector, batch.pixels, autocast) \
                if len(batch.records) else None
            if pending is not None:  # batch k-1 is committed while the model runs batch k
                yield from finish(*pending)
            pending = (batch, future)
        if pending is not None:
            yield from finish(*pending)
        finished = True
    finally:
        if batches is not None:
            batches.close()  # stops the DataLoader workers when the caller stops early
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        seconds = time.perf_counter() - started
        summary = {**counts, **(declared if evidence else {}),
                   "skipped": skip.total() if skip is not None else 0,
                   "skipped_not_image": dict(sorted(not_images.items())),
                   "seconds": round(seconds, 3),
                   "images_per_s": round((counts["scored"] + counts["errors"]) / max(seconds, 1e-9), 1),
                   "model": mid, "decoder": chosen, "workers": workers, "device": str(dev),
                   "complete": finished}
        if store is not None:
            try:
                if skip is not None:
                    skip.done.close()  # before the checkpoint, which an open reader would hold up
                store.finish_run(run, summary)
                if finished and export is not None:
                    summary["exported"] = store.export(export, model=mid, threshold=threshold)
                    summary["export"] = os.fspath(export)
            finally:
                store.close()  # checkpoints and releases the writer lock
            summary["out"] = os.fspath(out)
        if stats is not None:
            stats.update(summary)


def _count_declared(results: list[ScanResult], declared: dict[str, int]) -> None:
    """Add a batch's scored items that declared AI (and those labelled real) or a capture."""
    for x in results:
        if x.score is None or not x.evidence:
            continue
        kind = provenance_of(x.evidence)
        if kind == DECLARED_AI:
            declared["declared_ai"] += 1
            declared["declared_ai_missed"] += x.label == 0
        elif kind == DECLARED_CAMERA:
            declared["declared_camera"] += 1


def scan_to_store(paths: Union[PathArg, Sequence[PathArg]], detector, *,
                  out: PathArg, **kwargs: Any) -> dict[str, Any]:
    """Run ``scan`` into the store ``out`` (required: the results are kept nowhere else) to the
    end without keeping them in memory; return the summary:
    ``scored``, ``errors``, ``skipped``, ``skipped_not_image``, ``declared_ai``,
    ``declared_ai_missed``, ``declared_camera``, ``seconds``, ``images_per_s``, ``model``,
    ``out``..."""
    stats: dict[str, Any] = {}
    for _ in scan(paths, detector, out=out, stats=stats, **kwargs):
        pass
    return stats
