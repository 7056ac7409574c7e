"""Build a frozen open_clip backbone from a JSON-able spec, with no hidden downloads.

A spec is one of
  {"model": "ViT-L-14", "pretrained": "openai"}          a named model and an open_clip tag,
  {"model": "ViT-L-14", "pretrained": "/path/ckpt.bin"}  a named model and a local checkpoint,
  {"model_cfg": {...open_clip CLIP config...}, "pretrained": null | "/path"}  an inline config
(the tiny test backbones). A tag's weights are looked up on disk only, where open_clip would put
them (``open_clip.pretrained.download_pretrained``: the Hugging Face hub cache for the tag's
``hf_hub`` file or its safetensors twin, else ``cache_dir`` or ``~/.cache/clip`` for its ``url``),
and the file found is handed to open_clip as a local checkpoint, so open_clip never asks the hub
whether a newer copy exists. Missing weights raise ``BackboneUnavailable`` naming the places
searched; ``download=True`` (the CLI's ``--allow-download``) is the one way to fetch them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import open_clip
import torch
from torch import nn

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's hub file names (open_clip/constants.py): the pickle and its safetensors twin.
HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME = "open_clip_pytorch_model.bin", "open_clip_model.safetensors"
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class BackboneUnavailable(RuntimeError):
    """The backbone's weights cannot be found locally (and nothing is downloaded for you)."""


@dataclass
class Backbone:
    clip: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: dict[str, Any]  # size, mean, std, interpolation, resize_mode
    has_weights: bool           # False: random init, the caller must save the weights itself


def _hub_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """A tag's ``hf_hub`` entry ('org/repo/' or 'org/repo/file') → repo id and the file names that
    open_clip tries, safetensors first (``download_pretrained_from_hf``)."""
    repo, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo, names


def _cached_weights(tag_cfg: dict[str, Any], cache_dir: Optional[str]) -> tuple[Optional[str], list[str]]:
    """The tag's weights file if it is on disk, and the places looked at. Filesystem only."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    looked: list[str] = []
    if tag_cfg.get("file"):
        return (tag_cfg["file"], looked) if os.path.isfile(tag_cfg["file"]) else (None, [tag_cfg["file"]])
    if tag_cfg.get("hf_hub"):
        repo, names = _hub_candidates(tag_cfg["hf_hub"])
        hub_cache = cache_dir or HF_HUB_CACHE  # explicit: old hubs bind their default at import
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, cache_dir=hub_cache)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, looked
        looked.append(f"{hub_cache} (hub cache of {repo}: {' or '.join(names)})")
    if tag_cfg.get("url"):
        # Unlike open_clip we do not re-hash the file on every load; a corrupt file fails to load.
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path, looked
        looked.append(path)
    return None, looked


def _needs_hub_files(name: str) -> bool:
    """Built-in configs whose text tower or tokenizer come from the hub (transformers), which
    cannot be asked to stay offline per call through open_clip."""
    try:
        text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    except OSError:  # a missing local-dir: create_model reports it
        return False
    local = name.startswith("local-dir:")  # its tokenizer files are read from the folder
    return bool(text_cfg.get("hf_model_name") or (text_cfg.get("hf_tokenizer_name") and not local))


def _resolve_tag(name: str, tag: str, tag_cfg: dict[str, Any], cache_dir: Optional[str], download: bool) -> str:
    path, looked = _cached_weights(tag_cfg, cache_dir)
    if path:
        return path
    if not download:
        raise BackboneUnavailable(
            f"weights for {name}/{tag} are not on this machine; looked in: {'; '.join(looked)}. "
            f"aigid never downloads them silently: pass download=True (CLI: --allow-download) to fetch "
            f"them once, put them in one of those places (--cache-dir), or give a local checkpoint "
            f"file as pretrained")
    logger.info("aigid: downloading the %s/%s weights (download allowed)", name, tag)
    try:
        return open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as err:  # open_clip wraps hub and urllib errors of every kind
        raise BackboneUnavailable(f"could not download the weights for {name}/{tag}: {err}") from err


def build_backbone(spec: dict[str, Any], cache_dir: Optional[str] = None, download: bool = False) -> Backbone:
    """The backbone ``spec`` names. ``cache_dir``: where tag weights live (default: the hub cache,
    then ``~/.cache/clip``). ``download``: allow fetching missing weights from the network."""
    pretrained = spec.get("pretrained")
    if "model_cfg" in spec:
        cfg = dict(spec["model_cfg"])
        clip = open_clip.CLIP(**cfg)
        if pretrained:
            if not os.path.isfile(pretrained):
                raise BackboneUnavailable(f"backbone checkpoint {pretrained!r} does not exist")
            open_clip.load_checkpoint(clip, pretrained, weights_only=True)
        text_cfg = cfg.get("text_cfg", {})
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
        size = cfg["vision_cfg"]["image_size"]
        preprocess = {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
        preprocess.update(spec.get("preprocess", {}))
        return Backbone(clip, tokenizer, preprocess, has_weights=bool(pretrained))

    name = spec["model"]
    if not download and (name.startswith("hf-hub:") or _needs_hub_files(name)):
        raise BackboneUnavailable(
            f"backbone {name!r} reads its config, text tower or tokenizer from the Hugging Face hub, "
            f"which aigid does not do unless asked: pass download=True (CLI: --allow-download), or "
            f"use 'local-dir:/path/to/folder'")
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if pretrained and not tag_cfg and not os.path.isfile(pretrained):
        raise BackboneUnavailable(
            f"{pretrained!r} is neither an open_clip tag of {name} nor an existing file; "
            f"tags: {open_clip.list_pretrained_tags_by_model(name)}")
    weights = _resolve_tag(name, pretrained, tag_cfg, cache_dir, download) if tag_cfg else pretrained
    try:
        clip = open_clip.create_model(
            name, pretrained=weights, cache_dir=cache_dir,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", spec.get("quick_gelu", False))),
        )
    except (RuntimeError, OSError, ValueError) as err:
        raise BackboneUnavailable(f"cannot build backbone {name} from {weights!r}: {err}") from err
    pp = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    # A tag's own normalisation (e.g. SigLIP's) is what open_clip would merge when given the tag.
    pp.update({k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg})
    size = pp.get("size", clip.visual.image_size)
    preprocess = {"size": size if isinstance(size, int) else int(size[0]),
                  "mean": list(pp.get("mean", OPENAI_MEAN)), "std": list(pp.get("std", OPENAI_STD)),
                  "interpolation": pp.get("interpolation", "bicubic"),
                  "resize_mode": pp.get("resize_mode", "shortest")}
    preprocess.update(spec.get("preprocess", {}))
    return Backbone(clip, open_clip.get_tokenizer(name, cache_dir=cache_dir), preprocess,
                    has_weights=bool(pretrained))
