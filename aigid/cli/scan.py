"""``aigid scan`` (one machine or ``--ray``) and ``aigid export`` (a results store to JSONL/CSV/Parquet)."""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3

from aigid.cli.checks import (CommandFailed, UsageError, _detector_arg, _device, _export_target, _positive,
                              _probability, _results_file, _writable_parent)
from aigid.cli.common import (_add_detector, _add_precision, _add_runtime, _command, _load_detector,
                              _print_json, _set_verdict)

log = logging.getLogger("aigid.cli")


def _check_scan(args) -> None:
    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:
        raise UsageError(f"no such path: {', '.join(missing)}")
    _device(args.device)
    folder_out = False
    if args.ray is not None:
        from aigid.scanning.ray import is_folder_out
        folder_out = is_folder_out(args.out)
        if args.actors is not None and not re.fullmatch(r"\d+(:\d+)?", args.actors):
            raise UsageError(f"--actors {args.actors}: expected MIN or MIN:MAX, e.g. 2:8")
        # the Ray stages decode in their own tasks and score with the detector's saved
        # settings: say so rather than ignore a flag that would change the local scan
        ignored = [flag for flag, given in (("--verdict", args.verdict is not None),
                                            ("--decoder", args.decoder != "auto"),
                                            ("--workers", args.workers is not None),
                                            ("--precision", args.precision is not None)) if given]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} cannot be used with --ray (Ray decodes in "
                             "its own tasks, sized by --items-per-task, and scores with the "
                             "detector's saved settings)")
    if not folder_out:
        _writable_parent(args.out, "results file")
        _results_file(args.out)
    if args.export:
        _export_target(args.export, None)
    _detector_arg(args.detector)


def _report_scan(args, summary: dict) -> int:
    """The scan's notices (nothing found; provenance counts) and its JSON summary, for the
    local and the Ray scan alike."""
    if not any(summary.get(k) for k in ("scored", "errors", "skipped")):
        others = sum((summary.get("skipped_not_image") or {}).values())
        more = (f"; {others} files skipped as not images by their extension (see skipped_not_image; "
                "--sniff reads their content)") if others and not args.sniff else ""
        log.warning("no images found under %s (looked for image files, .tar/.zip shards and "
                    ".txt/.lst lists)%s", ", ".join(args.paths), more)
    if summary.get("declared_ai") or summary.get("declared_camera"):
        log.info("provenance: %d images declare AI generation (the detector labelled %d of them real); "
                 "%d carry a camera capture claim", summary.get("declared_ai", 0),
                 summary.get("declared_ai_missed", 0), summary.get("declared_camera", 0))
    _print_json(summary)
    return 0  # unreadable images are results (stored with their reason), not a failure


def _cmd_scan_ray(args) -> int:
    """``--ray``: the driver fingerprints the folder and writes results; it never builds the model.
    The summary and its notices are those of the local scan (``--sniff`` included)."""
    from aigid.scanning.ray import scan_ray

    lo, _, hi = (args.actors or "1").partition(":")
    summary = scan_ray(args.paths, args.detector, out=args.out, batch_size=args.batch_size,
                       items_per_task=args.items_per_task, min_actors=int(lo),
                       max_actors=int(hi) if hi else (int(lo) if args.actors else None),
                       resume=not args.no_resume, retry_errors=args.retry_errors,
                       threshold=args.threshold, export=args.export, progress=not args.quiet,
                       evidence=not args.no_evidence, sniff=args.sniff,
                       address=None if args.ray == "local" else args.ray)
    return _report_scan(args, summary)


def _cmd_scan(args) -> int:
    from aigid.scanning.local import scan_to_store

    if args.ray is not None:
        return _cmd_scan_ray(args)
    detector = _load_detector(args)
    _set_verdict(detector, args.verdict)
    try:
        summary = scan_to_store(args.paths, detector, out=args.out, batch_size=args.batch_size,
                                decoder=args.decoder, num_workers=args.workers,
                                resume=not args.no_resume, retry_errors=args.retry_errors,
                                threshold=args.threshold, export=args.export, progress=not args.quiet,
                                sniff=args.sniff, evidence=not args.no_evidence)
    except sqlite3.DatabaseError as err:
        raise CommandFailed(f"{args.out}: not a usable results file ({err})") from None
    return _report_scan(args, summary)


def _check_export(args) -> None:
    if not os.path.isfile(args.db):
        raise UsageError(f"{args.db}: no such results file")
    _results_file(args.db)
    _export_target(args.out, args.format)


def _cmd_export(args) -> int:
    from aigid.scanning.store import ResultStore

    try:
        with ResultStore(args.db, readonly=True) as store:  # a running scan may hold the writer lock
            n = store.export(args.out, format=args.format, model=args.model, threshold=args.threshold)
    except sqlite3.DatabaseError as err:
        raise CommandFailed(f"{args.db}: not a usable results file ({err})") from None
    print(json.dumps({"exported": n, "out": args.out}))
    return 0


def _add_scan(sub) -> None:
    s = _command(sub, "scan", "score every image under folders, tar/zip shards or file lists into a "
                 "resumable SQLite results file", _cmd_scan, _check_scan)
    s.add_argument("paths", nargs="+", metavar="PATH", help="folder, image, .tar/.zip shard, or .txt/.lst list")
    _add_detector(s, threshold=None)
    s.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="score on a Ray cluster (aigid[dist]): bare = the cluster this machine is in, "
                   "ray://HEAD:10001 a remote one, 'local' a Ray started here; --out may then be a folder "
                   "or s3:// URI (Parquet files)")
    s.add_argument("--actors", metavar="MIN[:MAX]", help="with --ray: scoring actors (default: 1, up to one per GPU)")
    s.add_argument("--items-per-task", type=_positive, default=256,
                   help="with --ray: files or archive members per decode task")
    s.add_argument("--no-evidence", action="store_true",
                   help="do not read provenance evidence (C2PA, IPTC/XMP, generator metadata) from the files")
    s.add_argument("--out", default="results.sqlite", help="SQLite results file (created or resumed); "
                   "one scan writes it at a time, and labels follow the latest scan's --threshold")
    s.add_argument("--export", help="also write this model's results to a .jsonl, .csv or .parquet file")
    s.add_argument("--decoder", choices=("auto", "dali", "pil"), default="auto", help="image decoder")
    s.add_argument("--no-resume", action="store_true", help="rescore items already in --out")
    s.add_argument("--retry-errors", action="store_true", help="retry items stored as errors")
    s.add_argument("--sniff", action="store_true",
                   help="identify images by content (magic bytes) whatever their file name")
    s.add_argument("--verdict", choices=("head", "text"), help="UniGenDet: detection head (default) "
                   "or the generated answer's wording")
    _add_runtime(s, batch_size=64)
    _add_precision(s)
    s.set_defaults(workers=None)  # scan picks its own decode workers
    for action in s._actions:
        if action.dest == "workers":
            action.help = "decode processes (default: all cores but one on CUDA, few or none on CPU)"


def _add_export(sub) -> None:
    x = _command(sub, "export", "write a scan's results file as JSONL, CSV or Parquet", _cmd_export, _check_export)
    x.add_argument("db", help="SQLite results file written by `aigid scan`")
    x.add_argument("out", help="output file; the format comes from its suffix unless --format")
    x.add_argument("--format", choices=("jsonl", "csv", "parquet"), help="output format (default: from the suffix)")
    x.add_argument("--model", help="only this detector's results (default: all)")
    x.add_argument("--threshold", type=_probability,
                   help="label = fake when score > threshold (default: each model's latest scan's)")
