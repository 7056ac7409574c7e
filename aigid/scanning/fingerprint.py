"""A detector's identity (``model_id``) from its saved folder, without building the model.

``model_id(detector)`` hashes the config and every tensor of the built model's state
dict. A saved folder whose files hold that whole state dict gives the same id when the same bytes
are hashed from the files: MiraGe saved with its backbone (``backbone.safetensors``, keys under
``clip.``, beside ``model.safetensors``) and UniGenDet saved by ``save_pretrained``
(``model.safetensors`` is its ``state_dict()``). Tensors are read one at a time (a 7B folder is
never held whole). Other folders -- a MiraGe whose backbone comes from the open_clip cache, a
BAGEL release, a shipped name -- are not self-contained: ``identity_of_folder`` returns ``None``
and the caller must load the detector somewhere to ask ``model_id``.

``layout`` is a cheap twin of the id (config plus tensor names, dtypes and shapes, no bytes): a
process that builds the model anyway (a Ray scoring actor) compares it with the folder's, so a
folder read differently from how the model loads it fails loudly instead of resuming under a
wrong id.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

# the hashing lives with the models (a precision change must keep a detector's id); re-exported
from aigid.models.identity import _config_json, config_dict, detector_layout, fingerprint, layout, model_id  # noqa: F401

__all__ = ["FolderIdentity", "fingerprint", "layout", "detector_layout", "identity_of_folder",
           "model_id_of_folder", "model_id", "config_dict"]

CONFIG_FILE, WEIGHTS_FILE, BACKBONE_PREFIX = "config.json", "model.safetensors", "clip."


@dataclass(frozen=True)
class FolderIdentity:
    model: str  # equals model_id(load_detector(folder))
    layout: str  # equals detector_layout(load_detector(folder))
    config: dict[str, Any]  # the loaded detector's config as a dict (what runs record)
    preprocess: dict[str, Any]


def _load_json(folder: str) -> Optional[dict[str, Any]]:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _mirage(folder: str, raw: dict[str, Any]) -> Optional[tuple[dict, list[tuple[str, str, str]]]]:
    from aigid.models.card import drop_hf_fields
    from aigid.models.mirage import MiraGeConfig

    raw = drop_hf_fields(raw, "mirage")
    backbone = dict(raw["backbone"])
    weights_file = backbone.pop("weights_file", None)
    if not weights_file or not isinstance(raw.get("preprocess"), dict):
        return None  # backbone weights from a cache, or preprocessing merged only when built
    raw["backbone"] = backbone
    config = asdict(MiraGeConfig(**raw))  # MiraGe.from_pretrained's config, defaults filled in
    return config, [(os.path.join(folder, weights_file), BACKBONE_PREFIX),
                    (os.path.join(folder, WEIGHTS_FILE), "")]


def _unigendet(folder: str, raw: dict[str, Any]) -> Optional[tuple[dict, list[tuple[str, str, str]]]]:
    from aigid.models.unigendet import UniGenDetConfig

    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        return None  # a BAGEL release: keys are renamed when loaded
    return asdict(UniGenDetConfig.from_dict(raw)), [(weights, "")]


def identity_of_folder(folder: str | os.PathLike) -> Optional[FolderIdentity]:
    """The id, layout, config and preprocessing of a saved detector folder from its files, or
    ``None`` when the folder does not hold the whole state dict (load the detector instead)."""
    from safetensors import safe_open

    folder = os.fspath(folder)
    raw = _load_json(folder) if os.path.isdir(folder) else None
    if raw is None:
        return None
    arch = raw.get("arch") or "mirage"  # as aigid.models.registry reads a folder
    reader = {"mirage": _mirage, "unigendet": _unigendet}.get(arch)
    found = reader(folder, raw) if reader is not None else None
    if found is None:
        return None
    config, files = found
    if not all(os.path.isfile(path) for path, _ in files):
        return None
    handles = [safe_open(path, "pt") for path, _ in files]
    names = sorted((prefix + key, i, key) for i, ((_, prefix), f) in enumerate(zip(files, handles))
                   for key in f.keys())
    shapes: list[tuple[str, torch.dtype, tuple]] = []

    def tensors():
        for name, i, key in names:
            t = handles[i].get_tensor(key)
            shapes.append((name, t.dtype, tuple(t.shape)))
            yield name, t

    model = fingerprint(config, arch, tensors())
    preprocess = dict(config.get("preprocess") or {})
    return FolderIdentity(model, layout(config, shapes), config, preprocess)


def model_id_of_folder(folder: str | os.PathLike) -> Optional[str]:
    """``model_id`` of the detector saved in ``folder``, from its files alone; ``None``
    when the folder is not self-contained (see the module docstring)."""
    found = identity_of_folder(folder)
    return found.model if found is not None else None
