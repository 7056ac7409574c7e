"""``load_detector(name_or_path)``: a saved detector folder, or a shipped config by name."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from aigid.models.precision import set_precision
from aigid.models.precision_record import read_record

CONFIG_FILE = "config.json"  # every detector folder's config (MiraGe's and UniGenDet's)


def _mirage():
    from aigid.models.mirage import MiraGe  # imported on demand: open_clip, torchvision
    return MiraGe


def _unigendet():
    from aigid.models.unigendet import UniGenDet  # imported on demand: MoT, SigLIP, flow
    return UniGenDet


_ARCHS = {"mirage": _mirage, "unigendet": _unigendet}


def _arch_of(folder: str) -> str:
    """``arch`` from config.json; a folder with BAGEL's ema.safetensors and no arch is a release."""
    config = os.path.join(folder, CONFIG_FILE)
    arch = None
    if os.path.isfile(config):
        with open(config) as f:
            arch = json.load(f).get("arch")
    if arch is None and os.path.isfile(os.path.join(folder, "ema.safetensors")):
        return "unigendet"
    return arch or "mirage"


def load_detector(name_or_path: str, cache_dir: Optional[str] = None, device: Optional[str] = None,
                  checkpoint: Optional[str] = None, download: bool = False,
                  precision: Optional[str] = None):
    """Load a detector saved with ``save_pretrained`` (or a BAGEL/UniGenDet release folder), or
    build a named config: ``mirage-tiny``, ``mirage-vit-l-14``, ``unigendet-tiny``, ``unigendet-bagel-7b``.

    ``checkpoint``: fine-tuned weights merged over a UniGenDet/BAGEL base folder (as the public
    code loads UniGenDet). ``download``: MiraGe may fetch a missing backbone tag (never by
    default: weights are looked up in the local caches only). A named config gives an *untrained*
    detector (its prompts are random): useful to train from, or to measure speed, never to trust
    its scores. ``precision``: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"auto"`` (bf16 on CUDA, and on CPUs
    with AMX/AVX512-BF16 for a folder whose ``precision.json`` shows bf16 agrees with fp32, else
    fp32; see ``aigid.models.precision``); ``None`` (default) keeps what
    aigid always did, bf16 autocast on CUDA and fp32 on a CPU. ``detector.precision`` says which.
    """
    if os.path.isdir(name_or_path):
        arch = _arch_of(name_or_path)
        if arch not in _ARCHS:
            raise ValueError(f"{name_or_path}: unknown detector arch {arch!r}")
        if checkpoint is not None and arch != "unigendet":
            raise ValueError(f"{name_or_path}: checkpoint= applies to UniGenDet folders only")
        extra = {"checkpoint": checkpoint} if checkpoint is not None else {}
        if arch == "mirage":
            extra["download"] = download
        model = _ARCHS[arch]().from_pretrained(name_or_path, cache_dir=cache_dir, **extra)
        model.precision_record = read_record(name_or_path)  # what auto's bf16 choice rests on
    elif name_or_path.startswith("mirage-"):
        warnings.warn(f"{name_or_path} is an untrained configuration: train it before trusting scores",
                      stacklevel=2)
        from aigid.models.mirage import MiraGeConfig
        model = _mirage()(MiraGeConfig.named(name_or_path.removeprefix("mirage-")), cache_dir=cache_dir,
                          download=download)
    elif name_or_path.startswith("unigendet-"):
        warnings.warn(f"{name_or_path} is an untrained configuration: train it before trusting scores",
                      stacklevel=2)
        from aigid.models.unigendet import UniGenDetConfig
        model = _unigendet()(UniGenDetConfig.named(name_or_path.removeprefix("unigendet-")))
    else:
        raise FileNotFoundError(f"{name_or_path!r} is neither a detector folder nor a known name "
                                "(mirage-tiny, mirage-vit-l-14, unigendet-tiny, unigendet-bagel-7b)")
    model = model.to(device).eval() if device else model.eval()
    set_precision(model, precision)
    return model
