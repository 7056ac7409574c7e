"""Loading BAGEL / UniGenDet release folders, and building the external VAE.

A BAGEL base folder holds ``llm_config.json`` / ``vit_config.json`` (Qwen2 and SigLIP sizes), the
Qwen2 tokenizer, the FLUX VAE ``ae.safetensors`` and ``ema.safetensors`` (BAGEL's key names,
which our modules mirror). The fine-tuned UniGenDet checkpoint is a second safetensors file; the
public ``eval/det/fakevlm_test.py`` merges the two, the fine-tuned keys winning and the base
filling the keys the checkpoint lacks. :func:`read_release_weights` does the same, names the file
that supplied each key group in the log, and refuses to guess between competing weight files.
The VAE (BAGEL's ``ae.safetensors``, FLUX layout) is built by :mod:`aigid.models.unigendet.vae`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from aigid.models.unigendet.config import UniGenDetConfig
from aigid.models.unigendet.mot import MoTConfig
from aigid.models.unigendet.siglip import patch_weight_from_linear

__all__ = ["release_config", "release_to_ours", "weight_file",
           "read_release_weights", "VAE_FILES"]

log = logging.getLogger(__name__)
VAE_FILES = ("ae.safetensors", "vae.safetensors")  # autoencoders, never candidate model weights


def weight_file(folder: Union[str, os.PathLike], name: Optional[str] = None) -> Path:
    """The one model-weights file of ``folder``: ``name`` when given, else the only candidate.

    Candidates are ``*.safetensors`` (not the VAE's, not shards listed by an index) and
    ``*.safetensors.index.json``. Several candidates are an error naming them: a folder with
    BAGEL's ``ema.safetensors`` beside fine-tuned weights must say which one it means.
    """
    folder = Path(folder)
    if name is not None:
        path = folder / name if not os.path.isabs(name) else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found")
        return path
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    sharded = set()
    for index in indexes:
        try:
            sharded |= set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
    files = [f for f in sorted(folder.glob("*.safetensors")) if f.name not in VAE_FILES and f.name not in sharded]
    candidates = indexes + files
    if not candidates:
        raise FileNotFoundError(f"{folder}: no model weights (*.safetensors besides {', '.join(VAE_FILES)})")
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise ValueError(f"{folder}: several weight files ({names}); name the base weights with "
                         f"weights='<file>' and pass a fine-tuned file as checkpoint=")
    return candidates[0]


def read_release_weights(base: Union[str, os.PathLike], checkpoint: Optional[Union[str, os.PathLike]] = None,
                         weights: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The base folder's weights with ``checkpoint`` (a file, or a folder with one weights file)
    merged over them, as the public demo/evaluation do; logs which file supplied how many keys."""
    from aigid.models.checkpoint import load_state_dict_dir

    base_file = weight_file(base, weights)
    state = load_state_dict_dir(base_file)
    log.info("UniGenDet: %d tensors from %s", len(state), base_file)
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        ckpt_file = weight_file(ckpt) if ckpt.is_dir() else ckpt
        if not ckpt_file.is_file():
            raise FileNotFoundError(f"{ckpt_file}: checkpoint not found")
        tuned = load_state_dict_dir(ckpt_file)
        overridden = len(set(tuned) & set(state))
        log.info("UniGenDet: %d tensors from %s (%d replace the base's, %d new)", len(tuned), ckpt_file,
                 overridden, len(tuned) - overridden)
        state.update(tuned)
    return state


def release_config(directory: str) -> UniGenDetConfig:
    """bagel-7b, overridden by the release's Qwen2 / SigLIP configs (BAGEL drops SigLIP's last
    layer), with the folder's tokenizer and ``ae.safetensors`` (as the public demo loads them)."""
    config = UniGenDetConfig.named("bagel-7b")
    llm, vit = os.path.join(directory, "llm_config.json"), os.path.join(directory, "vit_config.json")
    if os.path.isfile(llm):
        with open(llm) as f:
            config.llm = MoTConfig.from_qwen2(json.load(f)).to_dict()
    if os.path.isfile(vit):
        with open(vit) as f:
            v = json.load(f)
        config.vit = {"hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
                      "num_layers": v["num_hidden_layers"] - 1, "num_heads": v["num_attention_heads"],
                      "image_size": v.get("image_size", 980), "patch_size": v.get("patch_size", 14),
                      "layer_norm_eps": v.get("layer_norm_eps", 1e-6)}
    ae = os.path.join(directory, "ae.safetensors")
    if os.path.isfile(ae) and not config.vae.get("path"):  # BAGEL ships the FLUX AE beside its weights
        config.vae = {**config.vae, "path": ae}
    if config.tokenizer.get("kind") == "qwen2" and not config.tokenizer.get("path"):
        config.tokenizer = {**config.tokenizer, "path": directory}
    return config


def release_to_ours(state: dict[str, torch.Tensor], conv_shape: torch.Size) -> dict[str, torch.Tensor]:
    """BAGEL stores SigLIP's patch embedding as a Linear over channel-last patches: make it a conv
    of ``conv_shape`` (the model's ``patch_embedding.weight.shape``)."""
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    w = state.get(key)
    if w is not None and w.ndim == 2:
        state = {**state, key: patch_weight_from_linear(w, conv_shape, key)}
    return state
