"""Safetensors checkpoints: read BAGEL-style weight folders, load by key prefix, save safely.

BAGEL releases ``ema.safetensors`` (one file, every key under ``language_model.``,
``vit_model.``, ``connector.`` ...); Hugging Face style folders hold ``model.safetensors`` or
shards listed in ``*.safetensors.index.json``. :func:`load_state_dict_dir` reads any of them;
:func:`load_into` takes the keys under one prefix, strips it and loads them into a module with a
report (or a clear error) about missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["LoadReport", "load_state_dict_dir", "load_into", "save_state_dict", "apply_umask", "write_text_atomically"]

PathLike = Union[str, os.PathLike]
_PREFERRED = ("ema.safetensors", "model.safetensors")
_SHOWN = 10  # keys listed in an error message


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)      # module keys the state did not provide
    unexpected: list[str] = field(default_factory=list)   # state keys (prefix stripped) the module lacks
    loaded: list[str] = field(default_factory=list)       # module keys that were loaded


def _load_index(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index} lists shard {shard!r}, which is missing from {index.parent}")
        part = load_file(str(shard_path))
        state.update({k: t for k, t in part.items() if weight_map.get(k) == shard})
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ValueError(f"{index}: {len(absent)} indexed keys are absent from their shards, e.g. {absent[:_SHOWN]}")
    return state


def load_state_dict_dir(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, on CPU.

    ``path``: a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a folder holding
    (in this order of preference) ``ema.safetensors``, ``model.safetensors``, one
    ``*.safetensors.index.json`` with its shards, or a single ``*.safetensors`` file.
    """
    p = Path(path)
    if p.is_file():
        if p.name.endswith(".safetensors.index.json"):
            return _load_index(p)
        if p.suffix == ".safetensors":
            return load_file(str(p))
        raise ValueError(f"{p}: expected a .safetensors file or a .safetensors.index.json")
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint at {p}")
    for name in _PREFERRED:
        if (p / name).is_file():
            return load_file(str(p / name))
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _load_index(indexes[0])
    files = sorted(p.glob("*.safetensors"))
    if not indexes and len(files) == 1:
        return load_file(str(files[0]))
    found = sorted(x.name for x in p.iterdir())[:20]
    raise FileNotFoundError(
        f"{p}: cannot tell which weights to load; expected ema.safetensors, model.safetensors, one "
        f"*.safetensors.index.json or a single *.safetensors file; found {found}")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, prefix: str = "",
              strict: bool = True, dtype: Optional[torch.dtype] = None) -> LoadReport:
    """Load the entries of ``state`` whose keys start with ``prefix`` (stripped) into ``module``.

    Shape mismatches always raise (they mean a wrong config). ``strict`` also raises when keys
    are missing or unexpected; the message lists the first ones of each. ``dtype`` (optional)
    casts the module's floating parameters/buffers and the loaded tensors to it. A module built on
    the ``meta`` device gets the checkpoint tensors assigned (no second copy in memory).
    """
    if prefix and not prefix.endswith("."):
        raise ValueError(f"prefix must end with '.', got {prefix!r}")
    sub = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
    if not sub and state:
        seen = sorted({k.split(".", 1)[0] + "." for k in state})[:_SHOWN]
        raise KeyError(f"no key starts with {prefix!r}; top-level prefixes in the state: {seen}")
    own = module.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(sub[k].shape)} vs module {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(sub)) if tuple(sub[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:_SHOWN]}")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys (in the module, not under {prefix!r} in the "
                        f"checkpoint): {missing[:_SHOWN]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (under {prefix!r} in the checkpoint, not "
                        f"in the module): {unexpected[:_SHOWN]}")
    if problems:
        raise RuntimeError(f"cannot load into {type(module).__name__}: " + "; ".join(problems))

    if dtype is not None:
        module.to(dtype)
        sub = {k: t.to(dtype) if t.is_floating_point() else t for k, t in sub.items()}
    on_meta = any(t.is_meta for t in own.values())
    keep = {k: t for k, t in sub.items() if k in own}
    module.load_state_dict(keep, strict=False, assign=on_meta)
    return LoadReport(missing=missing, unexpected=unexpected, loaded=sorted(keep))


def save_state_dict(path: PathLike, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` as safetensors: on CPU, contiguous, and with tensors that share storage
    (tied or viewed weights) cloned, which ``safetensors`` would otherwise refuse."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{k!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.numel() * t.element_size() == storage.nbytes()
        if storage.data_ptr() in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})
    apply_umask(path)


def _umask() -> int:
    try:  # Linux ≥ 4.7 reports it without the set-and-restore race of os.umask
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike) -> None:
    """Give a written file the mode a plain ``open(path, "w")`` would: ``0o666 & ~umask``.

    ``safetensors.save_file`` (and ``tempfile.mkstemp``) create files 0600, so a detector folder
    saved by one user could not be read by the service account that scans with it."""
    try:
        os.chmod(path, 0o666 & ~_umask())
    except OSError:  # a file system without POSIX modes: nothing to fix
        pass


def write_text_atomically(path: PathLike, text: str) -> str:
    """Write ``text`` to a temporary file beside ``path``, flushed to disk, then renamed over it: a
    crash leaves the old file or the new one, never half of one; the mode is the umask's."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
