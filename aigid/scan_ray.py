"""``scan_ray``: the same scan spread over a Ray cluster (``pip install aigid[dist]``).

    from aigid.scan_ray import scan_ray
    summary = scan_ray(["/shared/shards/"], "runs/mirage", out="results.sqlite")

The driver enumerates the work *units* (``sources.iter_units``: plain files, and archives left
unexpanded) and leaves out what the store already holds for this detector; a Ray Dataset of those
units goes through ``map_batches`` with a callable-class actor (``_Scorer``) that loads the
detector once, then reads, hashes, decodes (a thread pool: PIL releases the GIL) and scores its
units in batches, streaming each archive once. The records come back to the driver, which is the
only writer of the SQLite store (one transaction per block received), so resume, the table and
exports are exactly those of ``aigid.scan``.

Resume is driver-side: a done plain file is never sent; for an archive the driver sends the ids
of its members already done (one indexed range query), and the actor does not read those. Paths
(and the detector folder) must be visible at the same place on every node. Ids travel as bytes
(``utf-8``/``surrogateescape``) because Arrow strings cannot hold non-UTF-8 names.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from aigid.data.dataset import stack_images
from aigid.store import ResultRow, ResultStore, check_threshold, decode_id

__all__ = ["scan_ray"]

PathArg = Union[str, os.PathLike]


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError("scan_ray needs Ray Data: pip install 'aigid[dist]' (or 'ray[data]'); "
                          "aigid.scan runs without it on one machine") from err
    return ray


def _b(ident: str) -> bytes:
    return ident.encode("utf-8", "surrogateescape")


class _Scorer:
    """A Ray actor: holds one detector; turns a block of units into blocks of result records."""

    def __init__(self, detector: str, device: str, batch_size: int, threads: int):
        from aigid.data.transforms import eval_transform
        from aigid.models.registry import load_detector

        self.detector = load_detector(detector, device=device)
        self.device = torch.device(device)
        self.transform = eval_transform(self.detector.config.preprocess)
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max(1, threads))

    def _samples(self, units: list[dict]) -> Iterator[tuple]:
        """(id, size, bytes or None, error or None) for every item of the units, in order."""
        from aigid.data.sources import ItemError, read_file, stream_archive

        for unit in units:
            ident = decode_id(unit["id"])
            if unit["kind"] == "file":
                data, reason = read_file(ident, unit["size"])
                yield ident, unit["size"], data, reason
                continue
            done = {decode_id(d) for d in unit["done"] or ()}
            for got, data, reason in stream_archive(ident, fetch=lambda it: it.id not in done):
                if isinstance(got, ItemError):
                    if got.id not in done:
                        yield got.id, None, None, reason
                elif data is not None or reason is not None:  # else: done, not read
                    yield got.id, got.size, data, reason

    def _decode(self, sample):
        from aigid.data.decode_cpu import decode_image
        from aigid.data.images import ImageError
        from aigid.data.sources import content_hash

        ident, size, data, reason = sample
        if data is None:
            return ident, None, size, None, reason or "unreadable"
        digest = content_hash(data)
        try:
            return ident, digest, len(data), decode_image(data, self.transform), None
        except ImageError as err:
            return ident, digest, len(data), None, str(err)

    def _score(self, chunk: list) -> "Any":
        import pyarrow as pa

        decoded = list(self.pool.map(self._decode, chunk))
        ok = [d for d in decoded if d[3] is not None]
        scores: list = []
        if ok:
            pixels = stack_images([d[3].to(self.device, non_blocking=True) for d in ok])
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                scores = self.detector.predict(pixels).float().tolist()
        it = iter(scores)
        rows = [(d[0], d[1], d[2], next(it) if d[3] is not None else None, d[4]) for d in decoded]
        return pa.table({
            "id": pa.array([_b(r[0]) for r in rows], pa.binary()),
            "hash": pa.array([r[1] for r in rows], pa.string()),
            "size": pa.array([r[2] for r in rows], pa.int64()),
            "score": pa.array([r[3] for r in rows], pa.float64()),
            "error": pa.array([r[4] for r in rows], pa.string()),
        })

    def __call__(self, block) -> Iterator[Any]:
        chunk: list = []
        for sample in self._samples(block.to_pylist()):
            chunk.append(sample)
            if len(chunk) >= self.batch_size:
                yield self._score(chunk)
                chunk = []
        if chunk:
            yield self._score(chunk)


def _units(paths: Sequence[PathArg], store: Optional[ResultStore], model: str,
           retry_errors: bool) -> tuple[list[dict], list[tuple[str, str]], int]:
    """(rows for Ray, enumeration errors to record now, number of done items left out)."""
    from aigid.data.sources import Archive, ItemError, iter_units

    done = store.done_filter(model, include_errors=not retry_errors) if store else None
    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    skipped = 0
    for unit in iter_units(list(paths)):
        if isinstance(unit, Archive):
            members = store.done_in_archive(model, unit.id, include_errors=not retry_errors) \
                if store else []
            if done is not None and done(unit.id):  # the archive's own error (broken, truncated)
                members.append(unit.id)
            skipped += len(members)
            rows.append({"kind": "archive", "id": _b(unit.id), "size": unit.size,
                         "done": [_b(m) for m in members]})
        elif done is not None and done(unit.id):
            skipped += 1
        elif isinstance(unit, ItemError):
            errors.append((unit.id, unit.reason))
        else:
            rows.append({"kind": "file", "id": _b(unit.id), "size": unit.size, "done": []})
    if done is not None:
        done.close()
    return rows, errors, skipped


def scan_ray(paths: Union[PathArg, Sequence[PathArg]], detector_dir: str, *,
             out: PathArg, batch_size: int = 64,
             num_gpus_per_actor: Optional[float] = None, concurrency: Optional[int] = None,
             decode_threads: int = 4, resume: bool = True, retry_errors: bool = False,
             threshold: float = 0.5, export: Optional[PathArg] = None, progress: bool = True,
             ray_init: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Score everything under ``paths`` on Ray actors into the SQLite store ``out``; the summary.

    ``detector_dir``: a detector folder (or shipped name) every node can load.
    ``out``: the results file; the driver holds its writer lock for the whole run (see
    ``aigid.store``), so a second scan into it is refused.
    ``num_gpus_per_actor``: 1 when this machine has CUDA, else 0 (CPU actors).
    ``concurrency``: actors (default: one per GPU in the cluster, or 1 on CPU).
    Starts a local Ray (``ray.init(**ray_init)``) unless one is already running.
    """
    ray = _require_ray()
    from aigid.models.registry import load_detector
    from aigid.scan import _config_dict, model_id

    paths = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("scan_ray: no paths given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    threshold = check_threshold(threshold)
    gpus = (1 if torch.cuda.is_available() else 0) if num_gpus_per_actor is None else num_gpus_per_actor
    if not ray.is_initialized():
        ray.init(**(ray_init or {}))
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus else 1
    ray.data.DataContext.get_current().enable_progress_bars = progress

    probe = load_detector(detector_dir)  # on the driver, for the fingerprint and the metadata
    model = model_id(probe)
    preprocess, meta = probe.config.preprocess, _config_dict(probe)
    del probe

    started = time.perf_counter()
    counts = {"scored": 0, "errors": 0}
    finished, skipped = False, 0
    with ResultStore(out) as store:
        run = store.start_run(model, detector=meta, preprocess=preprocess, threshold=threshold,
                              decoder="pil-ray", paths=paths)
        try:
            rows, enum_errors, skipped = _units(paths, store if resume else None, model, retry_errors)
            now = time.time()
            store.write(ResultRow(i, model, None, None, None, None, r, now, run)
                        for i, r in enum_errors)
            counts["errors"] += len(enum_errors)
            if rows:
                ds = ray.data.from_items(rows).map_batches(
                    _Scorer, batch_format="pyarrow", batch_size=batch_size,
                    fn_constructor_kwargs={"detector": str(detector_dir),
                                           "device": "cuda" if gpus else "cpu",
                                           "batch_size": batch_size, "threads": decode_threads},
                    concurrency=concurrency, num_gpus=gpus)
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    now = time.time()
                    recs = block.to_pylist()
                    store.write(ResultRow(decode_id(r["id"]), model, r["hash"], r["size"],
                                          r["score"], None, r["error"], now, run)
                                for r in recs)  # labels are derived on read (this threshold)
                    n_err = sum(r["error"] is not None for r in recs)
                    counts["errors"] += n_err
                    counts["scored"] += len(recs) - n_err
            finished = True
        finally:
            seconds = time.perf_counter() - started
            summary = {**counts, "skipped": skipped,
                       "seconds": round(seconds, 3),
                       "images_per_s": round((counts["scored"] + counts["errors"]) / max(seconds, 1e-9), 1),
                       "model": model, "decoder": "pil-ray", "actors": concurrency,
                       "gpus_per_actor": gpus, "complete": finished, "out": os.fspath(out)}
            store.finish_run(run, summary)
        if export is not None:
            summary["exported"] = store.export(export, model=model, threshold=threshold)
            summary["export"] = os.fspath(export)
    return summary
