"""``load_detector(name_or_path)``: a saved detector folder, or a shipped config by name."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from aigid.models.mirage import CONFIG_FILE, MiraGe, MiraGeConfig

_ARCHS = {"mirage": MiraGe}


def load_detector(name_or_path: str, cache_dir: Optional[str] = None, device: Optional[str] = None):
    """Load a detector saved with ``save_pretrained``, or build ``mirage-tiny``/``mirage-vit-l-14``.

    A named config gives an *untrained* detector (its prompts are random): useful to train
    from, or to measure speed, never to trust its scores.
    """
    if os.path.isdir(name_or_path):
        with open(os.path.join(name_or_path, CONFIG_FILE)) as f:
            arch = json.load(f).get("arch", "mirage")
        if arch not in _ARCHS:
            raise ValueError(f"{name_or_path}: unknown detector arch {arch!r}")
        model = _ARCHS[arch].from_pretrained(name_or_path, cache_dir=cache_dir)
    elif name_or_path.startswith("mirage-"):
        warnings.warn(f"{name_or_path} is an untrained configuration: train it before trusting scores",
                      stacklevel=2)
        model = MiraGe(MiraGeConfig.named(name_or_path.removeprefix("mirage-")), cache_dir=cache_dir)
    else:
        raise FileNotFoundError(f"{name_or_path!r} is neither a detector folder nor a known name "
                                "(mirage-tiny, mirage-vit-l-14)")
    return model.to(device).eval() if device else model.eval()
