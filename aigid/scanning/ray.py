"""``scan_ray``: ``aigid.scan`` spread over a Ray cluster (``pip install aigid[dist]``).

    from aigid.scanning.ray import scan_ray
    summary = scan_ray(["/shared/shards/"], "runs/mirage", out="results.sqlite",
                       address="auto", max_actors=8)

A Ray Data pipeline, streamed (nothing is listed or decoded ahead of what the actors can take):

    paths -> walk -> expand -> decode (CPU tasks) -> Scorer (actor pool, GPUs) -> driver | Parquet

``walk`` lists the paths in one Ray task, ``expand`` lists each archive's members in a task of
its own, ``decode`` reads, hashes, decodes and preprocesses a slice of ``items_per_task`` files
or members per task (``decode_cpus`` each: CPU-only nodes decode for GPU nodes), and the scoring
actors (``min_actors``..``max_actors``, ``gpus_per_actor`` each, the detector loaded once per
actor on its own device) take blocks of ``batch_size`` images. The stages' code is in
``aigid.scanning.ray_stages``; ``repartition(target_num_rows_per_block=...)`` between them sets how
work is cut (one archive, one slice, one full model batch a block) and, with the batch sizes,
keeps Ray from fusing stages (the decode stage into the actors, or every stage into the walk).

Results: with ``out`` a results file, the driver is the only writer of the SQLite store (one
transaction per block received, rows carry the run id), exactly as ``aigid.scan`` writes it, so
resume, exports and ``aigid scan`` over the same file all agree. With ``out`` a folder (or an
``s3://``-style URI, or a path ending in ``/``), the cluster writes Parquet files there
(``aigid.scanning.store.COLUMNS`` plus ``run``) and the driver touches no result.

Resume: the ids already stored for this detector (errors too, unless ``retry_errors``) are put in
the object store as a sorted array of 16-byte keys (``scan_ray_stages.DoneSet``); ``walk`` and
``expand`` leave them out where they enumerate, so done files are never read and done members
never fetched. The detector is identified from its folder's files (``aigid.scanning.fingerprint``: the
same id as ``aigid.scanning.local.model_id``, no model built on the driver); a folder that does not hold
its whole state dict is fingerprinted by one Ray task that loads it on a worker.

Summary: the keys of ``aigid.scan``'s with the same meaning. ``skipped`` (done ids left out) and
``skipped_not_image`` (files and members left out as not images, by extension; with ``sniff``
judged by content in ``decode``) are reported by the stages to a tally actor. ``declared_ai``,
``declared_ai_missed``, ``declared_camera`` (with ``evidence``; absent without, as in
``aigid.scan``) count the images scored in this run by their stored evidence, with
``aigid.scan._count_declared``: the driver counts each block it stores (SQLite) or, for a Parquet
folder, this run's rows read back from the files. On a resumed run, as with ``aigid.scan``, items
already done are neither scored nor counted (``declared_*`` are this run's, not the store's),
while ``skipped_not_image`` counts again every non-image met (nothing is stored for them).

Paths (and the detector folder) must be visible at the same place on every node.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from typing import Any, Optional, Sequence, Union

from aigid.scanning.store import ResultRow, ResultStore, check_threshold, decode_id, display_id, label_of

__all__ = ["scan_ray"]

log = logging.getLogger(__name__)
PathArg = Union[str, os.PathLike]
DECODER = "pil-ray"


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError("scan_ray needs Ray Data: pip install 'aigid[dist]' (or 'ray[data]'); "
                          "aigid.scan runs without it on one machine") from err
    return ray


def is_folder_out(out: PathArg) -> bool:
    """Whether ``out`` names a Parquet folder (a URI, an existing folder, a path ending in /)."""
    text = os.fspath(out)
    return "://" in text or text.endswith(("/", os.sep)) or os.path.isdir(text)


# --------------------------------------------------------------------------- identity


def _identity_task(folder: str) -> tuple[str, str, dict, dict]:
    from aigid.models.registry import load_detector
    from aigid.scanning.fingerprint import config_dict, detector_layout, model_id

    detector = load_detector(folder)
    return model_id(detector), detector_layout(detector), config_dict(detector), \
        dict(detector.config.preprocess)


def _identity(ray, folder: str) -> tuple[str, Optional[str], dict, dict]:
    from aigid.scanning.fingerprint import identity_of_folder

    found = identity_of_folder(folder) if os.path.isdir(folder) else None
    if found is not None:
        return found.model, found.layout, found.config, found.preprocess
    log.info("%s does not hold its whole state dict: fingerprinting it on a Ray worker", folder)
    return ray.get(ray.remote(num_cpus=1)(_identity_task).remote(folder))


# --------------------------------------------------------------------------- done sets


def _sqlite_done(store: ResultStore, model: str, include_errors: bool):
    from aigid.scanning.ray_stages import done_keys, id_bytes

    sql = "SELECT id FROM results WHERE model=?" + ("" if include_errors else " AND error IS NULL")
    return done_keys(id_bytes(decode_id(v)) for (v,) in store.conn.execute(sql, (model,)))


def _parquet_tables(out: str, columns: list[str], filter=None):
    """Each readable Parquet file's rows under ``out``; a file cut short by a kill is logged and
    left out (its rows are scored again)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(out, format="parquet")
    except (FileNotFoundError, pa.ArrowInvalid):
        return
    for fragment in dataset.get_fragments():
        try:
            yield fragment.to_table(columns=columns, filter=filter)
        except (OSError, pa.ArrowInvalid) as err:
            log.warning("%s: unreadable Parquet file left out (%s)", fragment.path, err)


def _parquet_done(out: str, model: str, include_errors: bool):
    import pyarrow.compute as pc

    from aigid.scanning.ray_stages import done_keys, id_bytes

    cond = pc.field("model") == model
    if not include_errors:
        cond = cond & pc.field("error").is_null()
    ids = (ident for t in _parquet_tables(out, ["id"], cond) for ident in t.column("id").to_pylist())
    return done_keys(id_bytes(i) for i in ids)


def _tally(ray):
    class Tally:  # done ids and non-images left out by walk/expand/decode, for the summary
        def __init__(self):
            self.n, self.not_images = 0, Counter()

        def add(self, k: int, not_images: Optional[dict[str, int]] = None) -> None:
            self.n += k
            self.not_images.update(not_images or {})

        def total(self) -> tuple[int, dict[str, int]]:
            return self.n, dict(sorted(self.not_images.items()))

    return ray.remote(num_cpus=0)(Tally).remote()


def _declared() -> dict[str, int]:
    return {"declared_ai": 0, "declared_ai_missed": 0, "declared_camera": 0}


def _count_declared(recs: list[dict], threshold: Optional[float], declared: dict[str, int]) -> None:
    """``aigid.scan._count_declared`` over rows (``score``, ``evidence``, and ``label`` or the
    ``threshold`` to derive it), so both scanners count by one rule."""
    from aigid.scanning.local import ScanResult
    from aigid.scanning.local import _count_declared as count

    def label(r: dict) -> Optional[int]:
        if threshold is None:
            return r["label"]
        return None if r["score"] is None else label_of(r["score"], threshold)

    count([ScanResult("", None, None, r["score"], label(r), None, r["evidence"])
           for r in recs if r["score"] is not None and r["evidence"]], declared)


def _maybe_declared():
    """An expression true for evidence JSON that may declare AI or a capture: it holds the
    compact ``"provenance":"declared-..."`` of ``evidence_json`` (no spaces), so only those rows
    are parsed on the driver (``_count_declared`` decides exactly)."""
    import pyarrow.compute as pc

    from aigid.provenance import DECLARED_AI, DECLARED_CAMERA

    cond = None
    for kind in (DECLARED_AI, DECLARED_CAMERA):
        text = json.dumps({"provenance": kind}, separators=(",", ":"))[1:-1]
        found = pc.match_substring(pc.field("evidence"), text)
        cond = found if cond is None else cond | found
    return cond


# --------------------------------------------------------------------------- the pipeline


def build_dataset(paths: Sequence[PathArg], detector: str, *, preprocess: dict[str, Any],
                  layout: Optional[str] = None, batch_size: int = 64, items_per_task: int = 256,
                  decode_cpus: float = 1.0, min_actors: int = 1, max_actors: Optional[int] = None,
                  gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                  batches_per_actor: int = 2, actor_start_timeout_s: int = 600,
                  evidence: bool = True, sniff: bool = False, progress: bool = True,
                  done: Any = None, tally: Any = None, scorer: Optional[type] = None):
    """The Ray Dataset of scored rows (``scan_ray_stages.SCORED``), not yet executed.

    ``sniff``: files are judged by content, not name (see ``scan_ray_stages``); ``tally``: the
    actor the stages report skipped ids and non-images to (``_tally``; None: not counted).

    ``batches_per_actor``: batches queued on each actor (one scoring, one arriving: more lets
    the first actor up hoard the start of the stream). The pool waits for ``min_actors`` to be
    up (at most ``actor_start_timeout_s``) before scoring starts, so the work spreads from the
    first batch. ``scorer``: the actor class (default ``scan_ray_stages.Scorer``; benchmarks
    swap in a stand-in with the same constructor)."""
    import ray.data

    from aigid.scanning.ray_stages import DoneSet, Scorer, decode, expand, id_bytes, walk

    done = done if done is not None else DoneSet()
    listing = {"items_per_task": items_per_task, "done": done, "tally": tally, "sniff": sniff}
    rows = [{"path": id_bytes(os.fsdecode(os.fspath(p)))} for p in paths]
    # A dataset keeps the DataContext current when it was created: set ours for it alone.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.wait_for_min_actors_s, ctx.enable_progress_bars
    ctx.wait_for_min_actors_s, ctx.enable_progress_bars = actor_start_timeout_s, progress
    try:
        # One walk over all the paths (as aigid.scan: a file reached twice is counted once).
        ds = ray.data.from_items(rows, override_num_blocks=1)
    finally:
        ctx.wait_for_min_actors_s, ctx.enable_progress_bars = saved
    ds = ds.map_batches(walk, batch_size=None, batch_format="pyarrow", fn_kwargs=listing)
    # Blocks of one row and batch_size=1: one archive (then one slice) per task. A batch size
    # also keeps Ray from fusing a stage into the one before it (which would make every slice
    # wait for the single walk task).
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(expand, batch_size=1, batch_format="pyarrow", fn_kwargs=listing)
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(decode, batch_size=1, batch_format="pyarrow", num_cpus=decode_cpus,
                        fn_kwargs={"preprocess": preprocess, "batch_size": batch_size,
                                   "evidence": evidence, "sniff": sniff, "tally": tally})
    # Full model batches: strict, so the rows of small slices (a short archive, a slice's tail)
    # are merged across decode tasks instead of reaching the model as partial batches.
    ds = ds.repartition(target_num_rows_per_block=batch_size, strict=True)
    return ds.map_batches(
        scorer or Scorer, batch_size=batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"detector": detector, "layout": layout, "preprocess": preprocess},
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors,
                                           max_tasks_in_flight_per_actor=batches_per_actor),
        num_gpus=gpus_per_actor, num_cpus=cpus_per_actor)


def operators(ds) -> list[str]:
    """The operators of an executed dataset, from its stats (``Operator N Name: ...``)."""
    return re.findall(r"^Operator \d+ (.+?):", ds.stats(), flags=re.M)


def _export_rows(batch, *, model: str, threshold: float, run: str):
    import pyarrow as pa

    now = time.time()
    rows = [{"id": display_id(r["id"]), "model": model, "hash": r["hash"], "size": r["size"],
             "score": r["score"], "label": None if r["score"] is None else label_of(r["score"], threshold),
             "error": r["error"], "time": now, "evidence": r["evidence"], "run": run}
            for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("model", pa.string()), ("hash", pa.string()), ("size", pa.int64()),
        ("score", pa.float64()), ("label", pa.int8()), ("error", pa.string()),
        ("time", pa.float64()), ("evidence", pa.string()), ("run", pa.string())]))


def scan_ray(paths: Union[PathArg, Sequence[PathArg]], detector_dir: PathArg, *,
             out: PathArg, batch_size: int = 64, items_per_task: int = 256,
             decode_cpus: float = 1.0, min_actors: int = 1, max_actors: Optional[int] = None,
             gpus_per_actor: Optional[float] = None, cpus_per_actor: Optional[float] = None,
             resume: bool = True, retry_errors: bool = False, threshold: Optional[float] = None,
             evidence: bool = True, sniff: bool = False,
             batches_per_actor: int = 2, actor_start_timeout_s: int = 600,
             export: Optional[PathArg] = None, rows_per_file: int = 65536, progress: bool = True,
             address: Optional[str] = None, ray_init: Optional[dict[str, Any]] = None,
             _scorer: Optional[type] = None) -> dict[str, Any]:
    """Score everything under ``paths`` on a Ray cluster; return the summary.

    ``detector_dir``: a detector folder every node can read. ``out``: a results file (SQLite,
    written by this process alone) or a folder/URI for Parquet (see the module docstring).
    ``batch_size``: images per model call; ``items_per_task``: files or archive members per
    decode task (an archive is cut into slices of that many; a compressed tar stays whole);
    ``decode_cpus``: CPUs reserved per decode task.
    ``min_actors``/``max_actors``: the scoring actor pool, autoscaled between them (default max:
    the cluster's GPUs / ``gpus_per_actor``, or 1 without GPUs). ``gpus_per_actor``: default 1
    when the cluster has GPUs, else 0 (the actors score on CPU). ``cpus_per_actor``: default 1
    on GPUs (feeding the device), ``decode_cpus`` without (the model's threads).
    ``batches_per_actor``, ``actor_start_timeout_s``: see ``build_dataset``.
    ``threshold``: labels are ``score > threshold`` (default: the threshold stored in the
    detector's config by ``aigid calibrate``, else 0.5). ``evidence``: read each file's
    provenance evidence into the ``evidence`` column, as ``aigid.scan`` does (and count
    ``declared_*``). ``sniff``: identify images by their first bytes whatever their name, as
    ``aigid.scan``'s ``sniff``.
    ``address``: the cluster (``"auto"``, ``"ray://head:10001"``); a local Ray is started when
    none is running (``ray.init(address, **ray_init)``).
    The summary adds to ``aigid.scan``'s: ``actors`` (items and busy seconds per scoring actor),
    ``operators`` (the executed plan).
    """
    ray = _require_ray()
    paths = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("scan_ray: no paths given")
    for name, value in (("batch_size", batch_size), ("items_per_task", items_per_task),
                        ("min_actors", min_actors), ("rows_per_file", rows_per_file)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, not {value}")
    folder_out = is_folder_out(out)
    if export is not None and folder_out:
        raise ValueError("export= needs a results file (out=...sqlite); a Parquet folder is "
                         "already an export")
    if not ray.is_initialized():
        ray.init(address=address, **(ray_init or {}))
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = (1.0 if cluster_gpus else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    cpus = (1.0 if gpus else decode_cpus) if cpus_per_actor is None else float(cpus_per_actor)
    if max_actors is None:
        max_actors = max(min_actors, int(cluster_gpus // gpus) if gpus else 1)

    detector_dir = os.fspath(detector_dir)
    model, layout, config, preprocess = _identity(ray, detector_dir)
    if threshold is None:  # the detector's stored threshold (aigid calibrate), as aigid.scan
        from aigid.models.calibration import stored_threshold
        threshold = stored_threshold(config)
    threshold = check_threshold(threshold)
    pool = {"batch_size": batch_size, "items_per_task": items_per_task, "decode_cpus": decode_cpus,
            "min_actors": min_actors, "max_actors": max_actors, "gpus_per_actor": gpus,
            "cpus_per_actor": cpus, "batches_per_actor": batches_per_actor,
            "actor_start_timeout_s": actor_start_timeout_s, "progress": progress,
            "evidence": evidence, "sniff": sniff,
            "layout": layout, "preprocess": preprocess}
    if folder_out:
        return _to_parquet(ray, paths, detector_dir, os.fspath(out), model, pool, resume,
                           retry_errors, threshold, rows_per_file, _scorer)

    from aigid.scanning.ray_stages import DoneSet

    started = time.perf_counter()
    counts = {"scored": 0, "errors": 0}
    declared = _declared() if evidence else None
    per_actor: dict[str, dict[str, float]] = {}
    finished, ds, tally = False, None, _tally(ray)
    with ResultStore(out) as store:
        run = store.start_run(model, detector=config, preprocess=preprocess, threshold=threshold,
                              decoder=DECODER, paths=[os.fspath(p) for p in paths])
        try:
            keys = _sqlite_done(store, model, not retry_errors) if resume else None
            done = DoneSet(ray.put(keys) if keys is not None and len(keys) else None)
            ds = build_dataset(paths, detector_dir, done=done, tally=tally, scorer=_scorer, **pool)
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                now = time.time()
                recs = block.to_pylist()
                store.write(ResultRow(id=decode_id(r["id"]), model=model, hash=r["hash"],
                                      size=r["size"], score=r["score"], label=None,
                                      error=r["error"], time=now, run=run,
                                      evidence=r["evidence"]) for r in recs)
                _account(recs, counts, per_actor)
                if declared is not None:
                    _count_declared(recs, threshold, declared)
            finished = True
        finally:
            summary = _summary(ray, counts, declared, tally, started, model, per_actor, ds,
                               finished, pool)
            summary["out"] = os.fspath(out)
            store.finish_run(run, summary)
        if export is not None:
            summary["exported"] = store.export(export, model=model, threshold=threshold)
            summary["export"] = os.fspath(export)
    return summary


def _account(recs: list[dict], counts: dict[str, int], per_actor: dict[str, dict[str, float]]) -> None:
    for r in recs:
        counts["errors" if r["error"] is not None else "scored"] += 1
        a = per_actor.setdefault(r["actor"], {"items": 0, "busy_s": 0.0})
        a["items"] += 1
        a["busy_s"] += r["busy_s"]


def _summary(ray, counts, declared, tally, started, model, per_actor, ds, finished, pool
             ) -> dict[str, Any]:
    """``aigid.scan``'s summary keys (``declared_*`` only with evidence), then the pool's."""
    seconds = time.perf_counter() - started
    try:
        skipped, not_images = ray.get(tally.total.remote())
    finally:
        ray.kill(tally)
    return {**counts, **(declared or {}), "skipped": skipped, "skipped_not_image": not_images,
            "seconds": round(seconds, 3),
            "images_per_s": round((counts["scored"] + counts["errors"]) / max(seconds, 1e-9), 1),
            "model": model, "decoder": DECODER, "complete": finished,
            "actors": {a: {"items": int(v["items"]), "busy_s": round(v["busy_s"], 3)}
                       for a, v in sorted(per_actor.items())},
            "operators": operators(ds) if ds is not None else [],
            **{k: v for k, v in pool.items() if k not in ("layout", "preprocess", "progress")}}


def _to_parquet(ray, paths, detector_dir, out, model, pool, resume, retry_errors, threshold,
                rows_per_file, scorer) -> dict[str, Any]:
    """The Parquet path: the cluster writes the files; the driver counts this run's rows after."""
    import pyarrow.compute as pc

    from aigid.scanning.ray_stages import DoneSet

    started = time.perf_counter()
    run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tally, ds, finished = _tally(ray), None, False
    counts = {"scored": 0, "errors": 0}
    declared = _declared() if pool["evidence"] else None
    try:
        keys = _parquet_done(out, model, not retry_errors) if resume else None
        done = DoneSet(ray.put(keys) if keys is not None and len(keys) else None)
        ds = build_dataset(paths, detector_dir, done=done, tally=tally, scorer=scorer, **pool)
        ds = ds.map_batches(_export_rows, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"model": model, "threshold": threshold, "run": run})
        ds.write_parquet(out, min_rows_per_file=rows_per_file)
        finished = True
    finally:
        columns = ["error"] + (["score", "label", "evidence"] if declared is not None else [])
        for t in _parquet_tables(out, columns, pc.field("run") == run):
            errors = t.column("error").null_count
            counts["errors"] += t.num_rows - errors
            counts["scored"] += errors
            if declared is not None:  # labels as written, with this run's threshold
                _count_declared(t.filter(_maybe_declared()).to_pylist(), None, declared)
        summary = _summary(ray, counts, declared, tally, started, model, {}, ds, finished, pool)
    summary.update(out=out, run=run)
    return summary
