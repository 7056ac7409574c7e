"""What every command shares: the parser classes and common options, loading ``--detector``, and
printing results (stdout holds only each command's result)."""
from __future__ import annotations

import argparse
import json
import pickle
from typing import Any, Optional

from aigid.cli.checks import EXIT_USAGE, CommandFailed, UsageError, _non_negative, _positive, _probability


def _load_detector(args):
    """The detector of ``--detector`` (after ``_detector_folder`` checked its files), with the
    loaders' errors named by the folder."""
    from aigid.evaluation.runner import device_of
    from aigid.models.registry import load_detector

    try:
        return load_detector(args.detector, cache_dir=args.cache_dir, device=str(device_of(args.device)),
                             checkpoint=args.checkpoint, download=args.allow_download,
                             precision=getattr(args, "precision", None))
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


def _set_verdict(detector, verdict) -> None:
    """``--verdict head|text`` (UniGenDet): kept in the detector's config, so the scan's run record
    and result fingerprint say which verdict produced the scores."""
    if verdict is None:
        return
    if getattr(getattr(detector, "config", None), "verdict", None) is None:
        raise UsageError("--verdict applies to UniGenDet detectors only")
    detector.config.verdict = verdict


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default=None,
                   help="compute in fp32, bf16 (bf16 weights on a CPU) or int8 (MiraGe on a CPU, ONNX "
                   "Runtime, aigid[export]); auto: bf16 on CUDA, and on CPUs "
                   "with AMX/AVX512-BF16 where the detector's precision.json (aigid agreement) shows bf16 "
                   "agrees with fp32, else fp32. Default: "
                   "bf16 autocast on CUDA, fp32 on CPU")
