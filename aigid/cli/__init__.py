"""``aigid demo | train | eval | scan | export | serve | make-aligned | backends`` (the console script).

A person's mistake gets one line on stderr, ``aigid <command>: <what is wrong, naming the path>``,
and no traceback unless ``--debug``. Exit codes: 0 done; 2 the command line cannot work as given
(a bad value, a missing path, an output that cannot be written, a missing optional package or GPU),
found by the checks that run before any work starts; 1 the work failed (a corrupt or foreign file,
weights that cannot be found, ...); 130 interrupted; 141 the reader of stdout went away (``| head``).
Notices go through ``logging`` (INFO, WARNING with ``--quiet`` or ``AIGID_QUIET=1``); stdout holds
only each command's result.

One module per command group (``train``: demo/train/train-unigendet, ``evaluate``:
eval/calibrate/agreement/make-aligned, ``scan``: scan/export, ``serve``, ``models``: export-model/backends); ``checks``
holds the argument types and path checks, ``common`` the parser classes and shared options. Adding a
flag: put it in the command's ``_add_<command>`` and, when it names a path or has a range, check it
in the command's ``_check_<command>`` (run before the work, so a typo costs nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import sqlite3
import sys
import traceback
from typing import Iterator, Optional, Sequence

from aigid.cli.checks import (EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CommandFailed,
                              UsageError)
from aigid.cli.common import _command, _common, _Formatter, _Parser
from aigid.cli.evaluate import _add_agreement, _add_calibrate, _add_eval, _add_make_aligned
from aigid.cli.models import _add_export_model, _cmd_backends
from aigid.cli.scan import _add_export, _add_scan
from aigid.cli.serve import _add_serve
from aigid.cli.train import _add_demo, _add_train, _add_train_unigendet
from aigid.errors import MissingHeadError  # light: no model import
from aigid.version import __version__

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="aigid", description="Detect AI-generated images.", formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"aigid {__version__}")
    _common(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_train, _add_train_unigendet, _add_eval, _add_scan, _add_export, _add_serve,
                _add_calibrate, _add_agreement, _add_export_model, _add_make_aligned):
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
