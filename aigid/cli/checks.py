"""The checks a command line passes before any work starts: argument types (a bad value is
refused by argparse in one line), paths that must exist or be writable, the device asked for.
Each names the option and the path; a failure is a :class:`UsageError` (exit 2)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional


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
