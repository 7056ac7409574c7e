"""Building a UniGenDet from a folder: our saved one (``save_pretrained``), or a BAGEL base
folder plus an optional fine-tuned checkpoint (``from_pretrained`` calls :func:`load_pretrained`).
Heads the weights lack are initialised at random and recorded, so ``check_ready`` can refuse to
score with them."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from aigid.models.checkpoint import load_into
from aigid.models.unigendet.config import UniGenDetConfig
from aigid.models.unigendet.modules import unigendet_heads
from aigid.models.unigendet.release import read_release_weights, release_config, release_to_ours

log = logging.getLogger("aigid.models.unigendet.model")

CONFIG_FILE, WEIGHTS_FILE, VAE_FILE = "config.json", "model.safetensors", "vae.safetensors"
UNIGENDET_ONLY = ("fake_cls_head.", "diga_mlp.", "latent_to_vit_connector.")  # absent from BAGEL releases


def load_pretrained(cls: Any, directory: Union[str, os.PathLike], checkpoint: Optional[Union[str, os.PathLike]],
                    *, config: Optional[UniGenDetConfig], weights: Optional[str], allow_random_heads: bool,
                    map_location: str, dtype: Optional[torch.dtype]) -> Any:
    """``cls.from_pretrained``'s work (see its docstring); ``cls``: the model class to build."""
    directory = os.fspath(directory)
    ours = os.path.join(directory, CONFIG_FILE)
    raw = None
    if os.path.isfile(ours):
        with open(ours) as f:
            raw = json.load(f)
    if raw is not None and raw.get("arch") == "unigendet" and os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        model = cls(config or UniGenDetConfig.from_dict(raw))
        state = read_release_weights(directory, checkpoint, weights or WEIGHTS_FILE)
        check_loaded(model, load_into(model, state, strict=False), directory, allow_random_heads, None)
        vae_file = os.path.join(directory, VAE_FILE)
        if os.path.isfile(vae_file):
            model.vae.load_state_dict(load_file(vae_file, device=map_location))
        return model
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is neither a saved UniGenDet nor a BAGEL release folder")
    config = config or release_config(directory)
    with torch.device("meta"):
        model = cls(config)
    state = release_to_ours(read_release_weights(directory, checkpoint, weights),
                            model.vit_model.vision_model.embeddings.patch_embedding.weight.shape)
    check_loaded(model, load_into(model, state, strict=False, dtype=dtype), directory,
                 allow_random_heads, dtype)
    if dtype is not None:
        model.to(dtype)
    return model.to(map_location)


def check_loaded(model: nn.Module, report, directory: str, allow_random_heads: bool,
                 dtype: Optional[torch.dtype]) -> None:
    """Anything missing but UniGenDet's own heads is an error; missing heads are randomly
    initialised and recorded (``random_heads``), so ``check_ready`` can refuse to score."""
    missing = [k for k in report.missing if not k.startswith(UNIGENDET_ONLY)]
    if missing or report.unexpected:
        raise ValueError(f"{directory}: checkpoint does not match this config; missing "
                         f"{missing[:8]}, unexpected {list(report.unexpected)[:8]}")
    fresh = unigendet_heads(model.hidden_size, model.patch_latent_dim)
    for name, module in fresh.items():
        if any(k.startswith(name + ".") for k in report.missing):
            setattr(model, name, module.to(dtype) if dtype is not None else module)
            model.random_heads.append(name)
    if model.random_heads:
        log.warning("UniGenDet: %s has no %s; randomly initialised%s", directory,
                    ", ".join(model.random_heads),
                    "" if allow_random_heads else " (predict raises until a checkpoint supplies them)")
    model.source, model.allow_random_heads = directory, allow_random_heads
