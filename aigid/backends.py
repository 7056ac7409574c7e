"""What this machine can run: CUDA, Triton, flash-attn, xformers, DALI, bitsandbytes.

Every optional backend is probed once and lazily; callers ask here and fall back cleanly.
The choice actually used is announced once per process (``aigid: supcon=triton, ...``).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

__all__ = [
    "has_cuda", "has_triton", "has_flash_attn", "has_xformers", "has_dali", "has_bitsandbytes",
    "force_reference", "triton_interpret", "triton_usable", "available", "announce", "chosen",
]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.cache
def has_triton() -> bool:
    return _importable("triton")


@functools.cache
def has_flash_attn() -> bool:
    return _importable("flash_attn")


@functools.cache
def has_xformers() -> bool:
    return _importable("xformers")


@functools.cache
def has_dali() -> bool:
    return _importable("nvidia.dali")


@functools.cache
def has_bitsandbytes() -> bool:
    return _importable("bitsandbytes")


def force_reference() -> bool:
    """``AIGID_FORCE_REFERENCE=1`` makes every op use its plain-PyTorch reference."""
    return os.environ.get("AIGID_FORCE_REFERENCE", "0").strip().lower() in ("1", "true", "yes")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device, explicit: bool = False) -> bool:
    """Whether a Triton kernel may run on tensors on ``device``.

    Automatic dispatch uses Triton on CUDA only (the interpreter is far slower than the
    reference); an explicit ``backend="triton"`` also runs on CPU under ``TRITON_INTERPRET=1``,
    which is how the kernels are tested without a GPU.
    """
    if not has_triton():
        return False
    if device.type == "cuda":
        return True
    return explicit and triton_interpret()


def available() -> dict[str, bool]:
    return {
        "cuda": has_cuda(),
        "triton": has_triton(),
        "flash_attn": has_flash_attn(),
        "xformers": has_xformers(),
        "dali": has_dali(),
        "bitsandbytes": has_bitsandbytes(),
    }


log = logging.getLogger(__name__)
_announced: dict[str, str] = {}


def announce(op: str, choice: str) -> None:
    """Log (INFO) the backend an op runs on, once per (op, choice); ``AIGID_QUIET=1`` silences it."""
    if _announced.get(op) == choice:
        return
    _announced[op] = choice
    if os.environ.get("AIGID_QUIET", "0") != "1":
        log.info("%s=%s", op, choice)


def chosen() -> dict[str, str]:
    """The backend each op last ran on in this process."""
    return dict(_announced)
