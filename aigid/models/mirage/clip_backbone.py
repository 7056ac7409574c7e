"""Build a frozen open_clip backbone from a JSON-able spec, with no hidden downloads.

A spec is one of
  {"model": "ViT-L-14", "pretrained": "openai"}          a named model and an open_clip tag,
  {"model": "ViT-L-14", "pretrained": "/path/ckpt.bin"}  a named model and a local checkpoint,
  {"model_cfg": {...open_clip CLIP config...}, "pretrained": null | "/path"}  an inline config
(the tiny test backbones). Tags resolve through open_clip's cache (``cache_dir`` or its default);
a tag whose weights are not on disk raises ``BackboneUnavailable`` with what to do instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import open_clip
import torch
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneUnavailable(RuntimeError):
    """The backbone's weights cannot be found locally (and nothing is downloaded for you)."""


@dataclass
class Backbone:
    clip: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: dict[str, Any]  # size, mean, std, interpolation, resize_mode
    has_weights: bool           # False: random init, the caller must save the weights itself


def _offline_hub() -> None:
    # Ask huggingface_hub for cached files only: a closed network then fails fast and clearly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_backbone(spec: dict[str, Any], cache_dir: Optional[str] = None) -> Backbone:
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
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else None
    if pretrained and not tag_cfg and not os.path.isfile(pretrained):
        raise BackboneUnavailable(
            f"{pretrained!r} is neither an open_clip tag of {name} nor an existing file; "
            f"tags: {open_clip.list_pretrained_tags_by_model(name)}")
    _offline_hub()
    try:
        clip = open_clip.create_model(
            name, pretrained=pretrained, cache_dir=cache_dir,
            force_quick_gelu=bool((tag_cfg or {}).get("quick_gelu", spec.get("quick_gelu", False))),
        )
    except RuntimeError as err:
        raise BackboneUnavailable(
            f"weights for {name}/{pretrained} are not on this machine ({err}). aigid never downloads "
            f"them silently: put them in the open_clip cache (--cache-dir) or pass a local "
            f"checkpoint file as pretrained") from err
    pp = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", clip.visual.image_size)
    preprocess = {"size": size if isinstance(size, int) else int(size[0]),
                  "mean": list(pp.get("mean", OPENAI_MEAN)), "std": list(pp.get("std", OPENAI_STD)),
                  "interpolation": pp.get("interpolation", "bicubic"),
                  "resize_mode": pp.get("resize_mode", "shortest")}
    preprocess.update(spec.get("preprocess", {}))
    return Backbone(clip, open_clip.get_tokenizer(name), preprocess, has_weights=bool(pretrained))
