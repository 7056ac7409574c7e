"""``aigid demo | train | eval | scan | export | make-aligned | backends`` (the console script).

A person's mistake gets one line on stderr, ``aigid <command>: <what is wrong, naming the path>``,
and no traceback unless ``--debug``. Exit codes: 0 done; 2 the command line cannot work as given
(a bad value, a missing path, an output that cannot be written, a missing optional package or GPU),
found by the checks that run before any work starts; 1 the work failed (a corrupt or foreign file,
weights that cannot be found, ...); 130 interrupted; 141 the reader of stdout went away (``| head``).
Notices go through ``logging`` (INFO, WARNING with ``--quiet`` or ``AIGID_QUIET=1``); stdout holds
only each command's result.

Adding a flag: put it in the command's ``_add_<command>`` and, when it names a path or has a range,
check it in the command's ``_check_<command>`` (run before the work, so a typo costs nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import re
import sqlite3
import sys
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

from aigid import __version__
from aigid.errors import MissingHeadError  # light: no model import

log = logging.getLogger("aigid.cli")

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 1, 130, 141


class UsageError(Exception):
    """The command line cannot work as given (exit 2)."""


class CommandFailed(Exception):
    """The work failed on a file's content or the machine's state (exit 1)."""


# ---- argument types: a bad value is refused by argparse with one line ------------------------------
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be ≥ {low}")
        return value
    parse.__name__ = "int"
    return parse


def _float_in(low: float, high: Optional[float] = None, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or value < low or (open_low and value == low) or (high is not None and value > high):
            span = f"[{low}, {high}]" if high is not None else (f"> {low}" if open_low else f"≥ {low}")
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value
    parse.__name__ = "float"
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)
_probability = _float_in(0.0, 1.0)
_positive_float = _float_in(0.0, open_low=True)


# ---- up-front checks ---------------------------------------------------------------------------
def _must_exist(path: str, what: str) -> None:
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such {what}")


def _writable_parent(path: str, what: str) -> None:
    """``path`` is a file to be written: its folder must exist and take new files."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder; the {what} must be a file path")
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/stdout, a FIFO: its folder is moot
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        why = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise UsageError(f"{path}: cannot write the {what}: folder {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write the {what}: folder {parent} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{path}: the {what} exists and is not writable")


def _writable_dir(path: str, what: str) -> None:
    """``path`` is a folder to be created or filled: it (or its nearest existing ancestor) must be
    a writable folder."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{path}: cannot create the {what}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write the {what}: folder {probe} is not writable")


def _device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _labelled(data: str, split: Optional[str], opt: str = "data") -> list:
    """The labelled images of ``data`` (a folder or manifest), refusing an empty selection."""
    from aigid.data.labelled import discover

    _must_exist(data, "dataset folder or manifest")
    items = discover(data, split)
    if items:
        return items
    total = len(discover(data)) if split else 0
    if total:
        raise UsageError(f"{data}: no labelled images under a {split!r} folder ({total} exist outside "
                         f"it; drop --split or name another)")
    raise UsageError(f"{data}: no labelled images (expected real/fake, 0_real/1_fake or nature/ai "
                     f"folders of images, or a CSV/JSONL manifest)")


def _json_file(path: str, what: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommandFailed(f"{path}: the {what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CommandFailed(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")


def _safetensors_file(path: str) -> None:
    """Parse the header only (cheap, memory-mapped): catches a truncated or foreign file by name."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise CommandFailed(f"{path}: not a readable safetensors file ({err})") from None


SHIPPED_DETECTORS = ("mirage-tiny", "mirage-vit-l-14", "unigendet-tiny", "unigendet-bagel-7b")


def _detector_arg(path: str) -> None:
    """``--detector``: a folder (checked by ``_detector_folder``) or a shipped name."""
    if not os.path.isdir(path) and path not in SHIPPED_DETECTORS:
        raise UsageError(f"{path}: no such detector folder, and not a shipped name "
                         f"({', '.join(SHIPPED_DETECTORS)})")
    _detector_folder(path)


def _detector_folder(path: str) -> None:
    if not os.path.isdir(path):
        return  # a shipped name, or the loader's own "neither a folder nor a known name"
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        _json_file(config, "detector config")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            _safetensors_file(os.path.join(path, name))


def _checkpoint_file(path: str, opt: str) -> None:
    """``--pretrained`` names an open_clip tag or a local checkpoint; a file must look like one
    (a safetensors header, or a torch.save zip holding data.pkl), so a wrong file is named here
    rather than by torch's unpickler."""
    import zipfile

    if not os.path.exists(path):
        if os.sep in path or os.path.splitext(path)[1]:
            raise UsageError(f"{opt} {path}: no such checkpoint file")
        return  # an open_clip tag, resolved (offline) by the backbone loader
    if path.endswith(".safetensors"):
        _safetensors_file(path)
        return
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a legacy torch.save pickle
            return
    raise CommandFailed(f"{path}: not a model checkpoint (expected a .safetensors file or a "
                        f"PyTorch .pt/.pth/.bin written by torch.save)")


def _results_file(path: str) -> None:
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise CommandFailed(f"{path}: not an aigid results file (not SQLite)")


def _export_target(path: str, fmt: Optional[str]) -> None:
    _writable_parent(path, "export file")
    fmt = fmt or os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("jsonl", "csv", "parquet"):
        raise UsageError(f"{path}: cannot tell the export format from the suffix; use .jsonl, .csv "
                         f"or .parquet (or --format)")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError(f"{path}: Parquet export needs pyarrow (pip install pyarrow), or export "
                             f"to .jsonl / .csv") from None


def _load_detector(args):
    """The detector of ``--detector`` (after ``_detector_folder`` checked its files), with the
    loaders' errors named by the folder."""
    from aigid.evaluation.runner import device_of
    from aigid.models.registry import load_detector

    try:
        return load_detector(args.detector, cache_dir=args.cache_dir, device=str(device_of(args.device)),
                             checkpoint=args.checkpoint, download=args.allow_download)
    except pickle.UnpicklingError:
        raise CommandFailed(f"{args.checkpoint or args.detector}: holds pickled objects other than "
                            f"weights, which aigid does not load") from None
    except (TypeError, KeyError) as err:  # a config.json whose fields do not fit the detector
        raise CommandFailed(f"{args.detector}: not a detector folder aigid can load "
                            f"({type(err).__name__}: {err})") from None
    except Exception as err:
        if type(err).__name__ == "SafetensorError":
            raise CommandFailed(f"{args.detector}: its weights are not readable ({err})") from None
        raise


def _round(value: Any, digits: int = 4) -> Any:
    """Printed metrics: 4 decimals are plenty to read; the files keep full precision."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_round(value), indent=2))


# ---- commands: check_<cmd> runs before any work, _cmd_<cmd> does it ------------------------------
def _check_demo(args) -> None:
    _writable_dir(args.out, "demo folder")


def _cmd_demo(args) -> int:
    from aigid.demo import demo_report, run_demo

    summary = run_demo(out=args.out, steps=args.steps, per_photo=args.per_photo, vae_steps=args.vae_steps,
                       seed=args.seed, progress=not args.quiet)
    print(demo_report(summary, args.out))
    return 0


def _overrides(args) -> dict:
    keys = ("alpha", "temperature", "bank_size", "prompt_depth", "prompt_tokens")  # argparse dests
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.pretrained is not None:
        out["backbone"] = {"model": args.backbone or "ViT-L-14", "pretrained": args.pretrained}
    if args.prompt_init is not None:
        out["prompt_init"] = args.prompt_init
    if args.resize_mode is not None:
        out["preprocess"] = {"resize_mode": args.resize_mode}
    return out


def _check_train(args) -> None:
    from aigid.data.labelled import has_split

    if args.backbone is not None and args.pretrained is None:
        raise UsageError("--backbone needs --pretrained (an open_clip tag or a checkpoint file)")
    _device(args.device)
    split = "train" if has_split(args.data, "train") else None
    labels = {s.label for s in _labelled(args.data, split)}
    if labels != {0, 1}:
        have = "real" if labels == {0} else "fake"
        raise UsageError(f"{os.path.join(args.data, split or '')}: training needs both real and fake "
                         f"images, found only {have} ones")
    if args.val is not None:
        _labelled(args.val, None)
    if os.path.isdir(args.model):
        _detector_folder(args.model)
    elif os.path.isfile(args.model):
        _json_file(args.model, "model config")
    if args.pretrained is not None:
        _checkpoint_file(args.pretrained, "--pretrained")
    _writable_dir(args.out, "detector folder")
    if os.path.isfile(os.path.join(args.out, "config.json")) and not (args.overwrite or args.resume):
        raise UsageError(f"{args.out}: a detector is already there; pass --overwrite to replace it "
                         f"when training ends, or choose another --out")


def _cmd_train(args) -> int:
    from aigid.training.mirage import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, val=args.val, model=args.model,
                      overrides=_overrides(args), cache_dir=args.cache_dir, epochs=args.epochs,
                      max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                      num_workers=args.workers, device=args.device, seed=args.seed,
                      warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                      download=args.allow_download, resume=args.resume, overwrite=args.overwrite,
                      checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    try:
        summary = train(cfg)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never follow it
        raise CommandFailed(f"{args.pretrained or args.model}: holds pickled objects other than "
                            f"weights, which aigid does not load") from None
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    print(f"saved detector to {args.out} ({summary['steps']} steps, {summary['seconds']} s)")
    if "val" in summary:
        _print_json(summary["val"]["overall"])
    if summary["skipped_files"]:
        log.warning("%d unreadable files skipped (see %s)", len(summary["skipped_files"]),
                    os.path.join(args.out, "train_summary.json"))
    return 0


def _set_verdict(detector, verdict) -> None:
    """``--verdict head|text`` (UniGenDet): kept in the detector's config, so the scan's run record
    and result fingerprint say which verdict produced the scores."""
    if verdict is None:
        return
    if getattr(getattr(detector, "config", None), "verdict", None) is None:
        raise UsageError("--verdict applies to UniGenDet detectors only")
    detector.config.verdict = verdict


def _check_eval(args) -> None:
    from aigid.data.perturb import parse_sweep

    _device(args.device)
    if args.robustness:
        try:
            parse_sweep(args.robustness)
        except ValueError as err:
            raise UsageError(f"--robustness {args.robustness}: {err}") from None
    _labelled(args.data, args.split)
    if args.out:
        _writable_parent(args.out, "result file")
    if bool(args.format) != bool(args.report):
        raise UsageError("--format and --report DIR go together: the framework, and the folder its files go to")
    if args.report:
        _writable_dir(args.report, "report folder")
    if args.plots:
        _writable_dir(args.plots, "plots folder")
    _detector_arg(args.detector)


def _cmd_eval(args) -> int:
    from aigid.evaluation.runner import evaluate

    detector = _load_detector(args)
    _set_verdict(detector, args.verdict)
    result = evaluate(detector, args.data, split=args.split, batch_size=args.batch_size,
                      num_workers=args.workers, threshold=args.threshold, progress=not args.quiet,
                      robustness=args.robustness or (), plots_dir=args.plots)
    if args.format:
        from aigid.evaluation.formats import write_report
        written = write_report(result, args.report, args.format)
        log.info("wrote %d %s result files under %s", len(written), args.format, args.report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        _print_json({"overall": result["overall"], "written": args.out})
    else:
        _print_json(result)
    return 0


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
                                            ("--workers", args.workers is not None)) if given]
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


def _check_train_unigendet(args) -> None:
    _must_exist(args.data, "data config")
    if args.data.endswith(".json"):
        _json_file(args.data, "data config")
    if os.path.isdir(args.model):
        _detector_folder(args.model)
    elif args.model not in ("tiny", "bagel-7b"):
        raise UsageError(f"{args.model}: no such model folder, and not a shipped config (tiny, bagel-7b)")
    if args.checkpoint:
        _must_exist(args.checkpoint, "checkpoint")
    if args.data_state:
        _json_file(args.data_state, "data state")
    _writable_dir(args.out, "output folder")


def _cmd_train_unigendet(args) -> int:
    from aigid.training.unigendet.run import run_unigendet_training

    train = {k: v for k, v in (("lr", args.lr), ("warmup_steps", args.warmup_steps)) if v is not None}
    summary = run_unigendet_training({
        "stage": args.stage, "data": args.data, "out": args.out, "model": args.model,
        "checkpoint": args.checkpoint, "preset": args.preset, "steps": args.steps, "seed": args.seed,
        "device": None if args.device == "auto" else args.device, "train": train,
        "data_state": args.data_state, "checkpoint_every": args.checkpoint_every,
        "gradient_checkpointing": args.gradient_checkpointing, "progress": not args.quiet})
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    print(f"saved UniGenDet to {args.out} ({summary['steps']} steps, {summary['tokens']} tokens, "
          f"{summary['seconds']} s)")
    if sum(summary["skipped"].values()):
        log.warning("skipped samples %s (see %s)", summary["skipped"], os.path.join(args.out, "train_summary.json"))
    return 0


def _check_calibrate(args) -> None:
    _device(args.device)
    _detector_arg(args.detector)
    ours = os.path.isfile(os.path.join(args.detector, "config.json"))
    if args.out is None and (args.checkpoint or not ours):
        raise UsageError(f"{args.detector}: calibrate stores into a folder written by save_pretrained; "
                         f"give --out DIR for a name, a base/release folder or --checkpoint")
    if args.target_fpr is not None and not 0 <= args.target_fpr < 1:
        raise UsageError(f"--target-fpr {args.target_fpr}: must be in [0, 1)")
    _labelled(args.data, args.split)
    if args.out:
        _writable_dir(args.out, "detector folder")


def _cmd_calibrate(args) -> int:
    from aigid.models.calibration import save_calibration
    from aigid.models.card import refresh_card_calibration
    from aigid.evaluation.runner import calibrate

    detector = _load_detector(args)
    report = calibrate(detector, args.data, split=args.split, method=args.method,
                       target_fpr=args.target_fpr, balanced=args.balanced,
                       batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    if args.out:
        detector.save_pretrained(args.out)
        written = args.out
    else:
        written = save_calibration(args.detector, report["calibration"])  # config.json only, atomically
        refresh_card_calibration(args.detector, detector)  # keeps the card's training summary
    log.info("stored %s calibration, threshold %.4g (%s) in %s", report["method"], report["threshold"],
             report["rule"], written)
    _print_json({**{k: v for k, v in report.items() if k != "calibration"}, "written": str(written)})
    return 0


def _check_export_model(args) -> None:
    _detector_arg(args.detector)
    _writable_parent(args.out, "exported model")


def _cmd_export_model(args) -> int:
    from aigid.export.onnx import export_model

    detector = _load_detector(args)
    try:
        path = export_model(detector, args.out, format=args.format)
    except NotImplementedError as err:
        raise UsageError(str(err)) from None
    _print_json({"exported": str(path), "format": args.format})
    return 0


def _check_make_aligned(args) -> None:
    if not os.path.isdir(args.real_dir):
        raise UsageError(f"{args.real_dir}: no such folder of real images")
    _device(args.device)
    _writable_dir(args.out_dir, "output folder")


def _cmd_make_aligned(args) -> int:
    from aigid.data.aligned import load_vae, make_aligned

    counts = make_aligned(args.real_dir, args.out_dir,
                          load_vae(args.vae, device=args.device, download=args.allow_download),
                          progress=not args.quiet)
    print(json.dumps(counts))
    if not counts["written"]:
        raise CommandFailed(f"{args.real_dir}: no image could be reconstructed "
                            f"({counts['errors']} unreadable, see {os.path.join(args.out_dir, 'errors.jsonl')})")
    return 0


def _cmd_backends(args) -> int:
    from aigid import backends

    print(json.dumps(backends.available(), indent=2))
    return 0


# ---- the parser ----------------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is a real default (not for flags or unset options)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes in our one-line form (its default prints the usage block too)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command they set the value; absent, the global one stays.
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only: no notices, no progress bars")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")


def _command(sub, name: str, help: str, fn, check=None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
    _common(p)
    p.set_defaults(fn=fn, check=check)
    return p


def _add_runtime(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--batch-size", type=_positive, default=batch_size, help="images per batch")
    p.add_argument("--workers", type=_non_negative, default=0, help="data-loading processes (0: in the main process)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--cache-dir", help="where open_clip tag weights are looked up (default: the "
                   "Hugging Face hub cache, then ~/.cache/clip)")
    _add_allow_download(p)


def _add_allow_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-download", action="store_true",
                   help="fetch missing backbone/VAE weights from the network (off: local caches only)")


def _add_detector(p: argparse.ArgumentParser, threshold: Optional[float] = 0.5) -> None:
    p.add_argument("--detector", required=True, help="detector folder (save_pretrained) or name")
    p.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the --detector base folder")
    stored = "" if threshold is not None else " (default: the detector's stored threshold, else 0.5)"
    p.add_argument("--threshold", type=_probability, default=threshold,
                   help="label = fake when score > threshold (0..1; a score equal to it is real, as "
                   f"UnivFD/SIDBench/DeepfakeBench count){stored}")


def _add_demo(sub) -> None:
    d = _command(sub, "demo", "offline end-to-end demo: build a toy set, train, evaluate", _cmd_demo, _check_demo)
    d.add_argument("--out", default="demo-out", help="folder for the toy data, config and detector")
    d.add_argument("--steps", type=_positive, default=200, help="training steps")
    d.add_argument("--vae-steps", type=_non_negative, default=60,
                   help="steps fitting the small VAE that makes the fakes (more: closer fakes, slower)")
    d.add_argument("--per-photo", type=_positive, default=40, help="crops taken from each sample photo")
    d.add_argument("--seed", type=int, default=0, help="seed for crops, VAE and training")


def _add_train(sub) -> None:
    t = _command(sub, "train", "train a MiraGe detector on a labelled folder or manifest", _cmd_train, _check_train)
    t.add_argument("data", help="folder with real/fake (or 0_real/1_fake, nature/ai) leaves, or a CSV/JSONL manifest")
    t.add_argument("--out", default="runs/mirage", help="output detector folder")
    t.add_argument("--val", help="held-out data (default: the data's val/ split if present)")
    t.add_argument("--model", default="vit-l-14", help="shipped config (tiny, vit-l-14), a JSON config, or a detector folder")
    t.add_argument("--backbone", help="open_clip model name, with --pretrained (default: ViT-L-14)")
    t.add_argument("--pretrained", help="open_clip tag (weights in the local cache) or a local checkpoint "
                   "file for the backbone (default: the model config's)")
    for name, typ, what in (("alpha", float, "weight of the SupCon loss"),
                            ("temperature", _positive_float, "SupCon temperature"),
                            ("bank-size", _positive, "memory-bank entries"),
                            ("prompt-depth", _positive, "layers with learned prompts"),
                            ("prompt-tokens", _positive, "learned tokens per layer")):
        t.add_argument(f"--{name}", type=typ, help=f"{what} (default: the model config's)")
    t.add_argument("--epochs", type=_positive, default=5, help="passes over the training data")
    t.add_argument("--max-steps", type=_positive, help="stop after this many optimiser steps (default: no limit)")
    t.add_argument("--lr", type=_positive_float, default=0.0035, help="peak learning rate (cosine schedule)")
    t.add_argument("--warmup-epochs", type=_non_negative, default=0, help="constant --warmup-lr first (MaPLe: 1)")
    t.add_argument("--warmup-lr", type=_positive_float, default=1e-5, help="MaPLe's WARMUP_CONS_LR")
    t.add_argument("--prompt-init", help='"random" or words whose first B tokens start the layer-0 text '
                   'prompts, e.g. "a photo of a" (MaPLe) (default: random)')
    t.add_argument("--resize-mode", choices=("shortest", "squash", "none"),
                   help="none = centre crop only, no resize (UnivFD-style) (default: the model config's)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run saved in OUT.partial/ (same settings and data)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing detector folder at --out when training ends")
    t.add_argument("--checkpoint-every", type=_non_negative, default=500,
                   help="optimiser steps between checkpoints in OUT.partial/ (0: only on Ctrl-C)")
    _add_runtime(t, batch_size=32)
    for action in t._actions:
        if action.dest == "batch_size":
            action.help = "images per batch (per process under torchrun)"


def _add_eval(sub) -> None:
    e = _command(sub, "eval", "acc, real/fake acc, AP, AUROC, EER per generator, as JSON", _cmd_eval, _check_eval)
    e.add_argument("data", help="labelled folder or manifest")
    _add_detector(e)
    e.add_argument("--split", help="only images under this split folder, e.g. train/val/test (default: all)")
    e.add_argument("--out", help="write the full JSON result here (default: print it)")
    e.add_argument("--verdict", choices=("head", "text"), help="UniGenDet: read the detection head "
                   "(default) or parse the generated answer as the public evaluation does (the paper's accuracy)")
    e.add_argument("--format", choices=("sidbench", "univfd", "deepfakebench"),
                   help="also write the results as that framework does, into --report (clean numbers in "
                   "DIR, each --robustness perturbation in DIR/<name>)")
    e.add_argument("--report", metavar="DIR", help="folder for --format's files")
    e.add_argument("--plots", metavar="DIR", help="write roc.png and reliability.png here "
                   "(pip install 'aigid[plots]')")
    e.add_argument("--robustness", help="re-score under perturbations: 'sidbench' (JPEG 95/90/50/30, "
                   "blur sigma 2/4) or a list like jpeg90,blur2 (default: none)")
    _add_runtime(e, batch_size=64)


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


def _add_train_unigendet(sub) -> None:
    t = _command(sub, "train-unigendet", "train UniGenDet (GDUF or DIGA) from FakeClue conversations and "
                 "text-to-image shards; under torchrun, sharded with FSDP2", _cmd_train_unigendet,
                 _check_train_unigendet)
    t.add_argument("data", help="data config (JSON): detection (FakeClue JSON/JSONL + image_root), "
                   "generation (tar shards, parquet or t2i JSON), det_weight/gen_weight, max_tokens")
    t.add_argument("--stage", choices=("gduf", "diga"), required=True, help="GDUF (stage 1) or DIGA (stage 2)")
    t.add_argument("--out", required=True, help="output folder (model, train_log.jsonl, train_summary.json)")
    t.add_argument("--model", default="tiny", help="shipped config (tiny, bagel-7b), a saved folder or a "
                   "BAGEL base folder (under torchrun: a folder)")
    t.add_argument("--checkpoint", help="fine-tuned weights merged over a BAGEL base --model")
    t.add_argument("--preset", choices=("code", "paper"), default="code",
                   help="the released scripts' hyper-parameters, or the paper's")
    t.add_argument("--steps", type=_positive, default=1000, help="optimizer steps (packs)")
    t.add_argument("--lr", type=_positive_float, help="learning rate (default: the preset's)")
    t.add_argument("--warmup-steps", type=_non_negative, help="linear warm-up steps (default: the preset's)")
    t.add_argument("--checkpoint-every", type=_non_negative, default=0,
                   help="DCP checkpoints in OUT/checkpoints every this many steps; a rerun resumes (0: off)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    t.add_argument("--data-state", help="data_state.json of an earlier run: continue its data")
    t.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: each rank's LOCAL_RANK GPU)")


def _add_calibrate(sub) -> None:
    c = _command(sub, "calibrate", "fit calibrated P(fake) and a threshold on a labelled held-out split; "
                 "stored in the detector's config (predict, scan and eval use them)", _cmd_calibrate,
                 _check_calibrate)
    c.add_argument("detector", help="detector folder (save_pretrained)")
    c.add_argument("data", help="labelled folder or manifest")
    c.add_argument("--split", default="val", help="held-out split folder (never the training one)")
    c.add_argument("--method", choices=("temperature", "isotonic"), default="temperature",
                   help="temperature scaling or isotonic regression")
    rule = c.add_mutually_exclusive_group()
    rule.add_argument("--target-fpr", type=float,
                      help="threshold: the smallest with FPR on the reals <= this, e.g. 0.01 (default: 0.5)")
    rule.add_argument("--balanced", action="store_true", help="threshold: best balanced accuracy")
    c.add_argument("--out", help="save the calibrated detector here instead of updating DETECTOR/config.json")
    c.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the base folder (needs --out)")
    _add_runtime(c, batch_size=64)


def _add_export_model(sub) -> None:
    m = _command(sub, "export-model", "export a MiraGe detector as ONNX or a torch.export program "
                 "(preprocessed pixels in, P(fake) out)", _cmd_export_model, _check_export_model)
    m.add_argument("detector", help="detector folder (save_pretrained) or name")
    m.add_argument("out", help="output file (.onnx or .pt2)")
    m.add_argument("--format", choices=("onnx", "torch-export"), default="onnx", help="export format")
    m.add_argument("--device", default="cpu", help="where the detector is loaded for export")
    m.add_argument("--cache-dir", help="where open_clip tag weights are looked up")
    _add_allow_download(m)
    m.set_defaults(checkpoint=None)


def _add_make_aligned(sub) -> None:
    a = _command(sub, "make-aligned", "write VAE reconstructions (aligned fakes) of real images",
                 _cmd_make_aligned, _check_make_aligned)
    a.add_argument("real_dir", help="folder of real images (searched recursively)")
    a.add_argument("out_dir", help="where the reconstructions go, same layout, as PNG")
    a.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (or cached hub id)")
    a.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    _add_allow_download(a)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="aigid", description="Detect AI-generated images.", formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"aigid {__version__}")
    _common(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_train, _add_train_unigendet, _add_eval, _add_scan, _add_export, _add_calibrate,
                _add_export_model, _add_make_aligned):
        add(sub)
    _command(sub, "backends", "which optional backends this machine has", _cmd_backends)
    return p


# ---- main ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _notices(quiet: bool) -> Iterator[None]:
    """Route the ``aigid`` loggers to stderr for this command; undone after (tests call main twice)."""
    logger = logging.getLogger("aigid")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("aigid: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _describe(err: BaseException) -> tuple[int, str]:
    """Exit code and message for an error raised by a command."""
    if isinstance(err, UsageError):
        return EXIT_USAGE, str(err)
    if isinstance(err, CommandFailed):
        return EXIT_FAILED, str(err)
    if isinstance(err, pickle.UnpicklingError):
        return EXIT_FAILED, "a file holds pickled objects other than weights, which aigid does not load"
    if isinstance(err, OSError) and err.filename is not None:
        where = f"{err.filename} → {err.filename2}" if err.filename2 else err.filename
        return EXIT_FAILED, f"{where}: {err.strerror or err}"
    if isinstance(err, sqlite3.Error):
        return EXIT_FAILED, f"results file: {err}"
    from aigid.models.mirage.clip_backbone import BackboneUnavailable
    if isinstance(err, (OSError, ValueError, ImportError, MissingHeadError, BackboneUnavailable)):
        return EXIT_FAILED, str(err)
    return EXIT_FAILED, f"{type(err).__name__}: {err} (an aigid bug? rerun with --debug and report it)"


def _broken_pipe_behind(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BrokenPipeError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _quiet_stdout_after_broken_pipe() -> None:
    # Python's recipe (docs: signal, "Note on SIGPIPE"): point stdout at devnull so the flush at
    # exit does not raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (tests capture it)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    quiet = getattr(args, "quiet", False) or os.environ.get("AIGID_QUIET", "0") == "1"
    args.quiet, args.debug = quiet, debug
    with _notices(quiet):
        try:
            if args.check is not None:
                args.check(args)
            code = args.fn(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
            return code
        except BrokenPipeError:
            _quiet_stdout_after_broken_pipe()
            return EXIT_BROKEN_PIPE
        except KeyboardInterrupt as err:
            if debug:
                raise
            hint = f"; {_one_line(str(err))}" if str(err) else ""  # e.g. how to resume training
            print(f"aigid {args.command}: interrupted{hint}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:
            if _broken_pipe_behind(err):  # e.g. a store's cleanup failing after the pipe closed
                _quiet_stdout_after_broken_pipe()
                return EXIT_BROKEN_PIPE
            if debug:
                traceback.print_exc()
            code, message = _describe(err)
            print(f"aigid {args.command}: {_one_line(message)}", file=sys.stderr)
            return code

