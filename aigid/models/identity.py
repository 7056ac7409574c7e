"""A detector's identity: blake2b of its config and every tensor of its state dict.

``aigid.scanning.fingerprint`` computes the same id from a saved folder's files; here is the
hashing itself, low enough that a model can take its own id before a precision change recasts its
weights (``aigid.models.precision``)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable

import torch


def _config_json(config: dict[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, default=str).encode()


def fingerprint(config: dict[str, Any], arch: str,
                tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``"<arch>-<16 hex>"`` exactly as ``model_id`` computes it; ``tensors`` must
    come sorted by name."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_config_json(config))
    for name, tensor in tensors:
        t = tensor.detach().reshape(-1).cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return f"{config.get('arch') or arch}-{h.hexdigest()}"


def config_dict(detector) -> dict[str, Any]:
    config = getattr(detector, "config", None)
    if is_dataclass(config):
        return asdict(config)
    if isinstance(config, dict):
        return dict(config)
    return dict(vars(config)) if config is not None else {}


def model_id(detector) -> str:
    """``"<arch>-<16 hex>"``: blake2b of the config (JSON, sorted keys) and every tensor of the
    state dict (name, dtype, shape, bytes). Same weights and config → same id on any machine.
    A detector whose weights were recast for a precision (``set_precision``) keeps the id of the
    weights it was loaded with (``stored_model_id``): the precision is recorded beside it.

    Hashing a ViT-L's 1.7 GB takes seconds, and loading, precision, scan, serve and the agreement
    record each ask: the id is kept on the detector until its config or a tensor changes (a
    tensor's storage, or its in-place version counter, which optimiser steps and
    ``load_state_dict`` bump -- as MiraGe's anchor cache relies on; writes through ``.data``
    bypass it)."""
    stored = getattr(detector, "stored_model_id", None)
    if stored is not None:
        return stored
    config = config_dict(detector)
    tensors = sorted(detector.state_dict().items())
    key = (_config_json(config), tuple((k, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for k, t in tensors))
    cached = vars(detector).get("_model_id_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    mid = fingerprint(config, type(detector).__name__.lower(), tensors)
    vars(detector)["_model_id_cache"] = (key, mid)
    return mid


def layout(config: dict[str, Any], shapes: Iterable[tuple[str, torch.dtype, tuple]]) -> str:
    """Digest of the config and the sorted (name, dtype, shape) of every tensor: no bytes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_config_json(config))
    for name, dtype, shape in sorted(shapes, key=lambda s: s[0]):
        h.update(f"{name}|{dtype}|{tuple(shape)}\n".encode())
    return h.hexdigest()


def detector_layout(detector) -> str:
    stored = getattr(detector, "stored_layout", None)  # set before a precision change recast the weights
    if stored is not None:
        return stored
    return layout(config_dict(detector),
                  ((k, v.dtype, tuple(v.shape)) for k, v in detector.state_dict().items()))
