"""Hugging Face conventions for detector folders: HF-style config keys and a model card.

``config.json`` gets ``model_type`` / ``architectures`` / ``id2label`` / ``label2id`` beside
aigid's own fields, so hub tooling and ``transformers`` can tell what the folder holds; the
loaders drop them again (:func:`drop_hf_fields`), so folders written before and after load
alike. ``README.md`` is a model card: YAML front matter as the hub reads it, then what the
detector is, what it was trained on, how it preprocesses and where it must not be trusted.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Optional, Union

from aigid.models.checkpoint import apply_umask

__all__ = ["ID2LABEL", "LABEL2ID", "CARD_FILE", "hf_fields", "drop_hf_fields", "write_model_card",
           "model_card"]

CARD_FILE = "README.md"
# aigid's label convention (label 1 = fake; predict returns P(fake)); JSON keys are strings.
ID2LABEL = {"0": "real", "1": "fake"}
LABEL2ID = {"real": 0, "fake": 1}
_ARCHITECTURES = {"mirage": "MiraGe", "unigendet": "UniGenDet"}
_PAPERS = {"mirage": ("MiraGe", "2508.01525"), "unigendet": ("UniGenDet", "2604.21904")}
HF_FIELDS = ("model_type", "architectures", "id2label", "label2id")


def hf_fields(arch: str) -> dict[str, Any]:
    """The HF-style keys a detector's config.json carries."""
    return {"model_type": f"aigid-{arch}", "architectures": [_ARCHITECTURES[arch]],
            "id2label": dict(ID2LABEL), "label2id": dict(LABEL2ID)}


def drop_hf_fields(raw: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """``raw`` without the HF-style keys, after checking they agree with aigid's: another
    ``model_type`` means a config of another detector; another ``id2label`` would make the HF
    wrapper name the classes the other way round from ``predict``'s P(fake)."""
    raw = dict(raw)
    model_type = raw.get("model_type")
    if model_type is not None and model_type != f"aigid-{arch}":
        raise ValueError(f"config.json: model_type {model_type!r} is not aigid-{arch}")
    id2label = raw.get("id2label")
    if id2label is not None and {str(k): str(v).lower() for k, v in id2label.items()} != ID2LABEL:
        raise ValueError(f"config.json: id2label {id2label!r} differs from aigid's {ID2LABEL} "
                         "(scores are P(fake), label 1)")
    label2id = raw.get("label2id")
    if label2id is not None and {str(k).lower(): int(v) for k, v in label2id.items()} != LABEL2ID:
        raise ValueError(f"config.json: label2id {label2id!r} differs from aigid's {LABEL2ID}")
    for key in HF_FIELDS:
        raw.pop(key, None)
    return raw


# ---- the model card ------------------------------------------------------------------------
def _yaml_list(name: str, values: list[str]) -> list[str]:
    return [f"{name}:"] + [f"- {v}" for v in values]


def _front_matter(arch: str, license: Optional[str], datasets: list[str]) -> str:
    lines = ["---", "library_name: aigid", "pipeline_tag: image-classification"]
    if license:
        lines.append(f"license: {license}")
    lines += _yaml_list("tags", ["aigid", arch, "ai-generated-image-detection", "image-forensics"])
    if datasets:
        lines += _yaml_list("datasets", datasets)
    return "\n".join(lines + ["---", ""])


def _backbone(model: Any) -> tuple[str, list[str]]:
    """A line naming the backbone, and the limits it brings."""
    cfg = model.config
    if cfg.arch == "mirage":
        spec = cfg.backbone
        name = spec.get("model") or "an inline open_clip config (model_cfg)"
        if not getattr(model, "backbone_has_weights", True):
            return (f"{name}, **randomly initialised** (saved in backbone.safetensors)",
                    ["The backbone is random, not a pretrained CLIP: this detector is a toy for "
                     "tests and timing; its scores mean nothing on real data."])
        return f"{name}, weights `{spec.get('pretrained')}` (frozen; not stored in this folder)", []
    llm = cfg.llm if isinstance(cfg.llm, str) else f"MoT with {cfg.mot().num_layers} layers"
    limits = []
    if getattr(model, "random_heads", None):
        limits.append(f"The heads {', '.join(model.random_heads)} were randomly initialised at load "
                      "(a BAGEL base without UniGenDet's fine-tuned checkpoint): scores are not trained.")
    return f"BAGEL-style MoT `{llm}` + SigLIP vision tower + FLUX-style VAE", limits


def _training(summary: Optional[Mapping[str, Any]]) -> list[str]:
    if not summary:
        return ["Not recorded with this folder (it was not written by `aigid train`, or the "
                "training summary was not passed)."]
    data = summary.get("train_data") or {}
    cfg = summary.get("config") or {}
    lines = [f"- data: `{cfg.get('data', '?')}` (split: {summary.get('train_split') or 'whole folder'}), "
             f"{data.get('total', '?')} images"]
    for gen, counts in (data.get("per_generator") or {}).items():
        lines.append(f"  - {gen}: {counts.get('real', 0)} real, {counts.get('fake', 0)} fake")
    lines.append(f"- {summary.get('steps', '?')} steps on {summary.get('device', '?')}"
                 + "".join(f", {k} {cfg[k]}" for k in ("epochs", "batch_size", "lr", "seed") if k in cfg))
    skipped = summary.get("skipped_files") or []
    if skipped:
        lines.append(f"- {len(skipped)} unreadable training files were skipped")
    return lines


def _metrics(summary: Optional[Mapping[str, Any]]) -> list[str]:
    val = (summary or {}).get("val")
    if not val:
        return ["No evaluation recorded with this folder. Measure on your own data with "
                "`aigid eval DETECTOR DATA`."]
    overall = val.get("overall") or {}
    rows = ["| metric | value |", "|---|---|"]
    for key in ("n", "acc", "real_acc", "fake_acc", "ap", "auroc", "eer"):
        value = overall.get(key)
        if value is not None:
            rows.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    threshold = (val.get("protocol") or {}).get("threshold", 0.5)
    return [f"On the validation data (threshold {threshold} on P(fake)):", ""] + rows


def model_card(model: Any, summary: Optional[Mapping[str, Any]] = None,
               license: Optional[str] = None) -> str:
    """The model card of ``model`` (a MiraGe or UniGenDet) as Markdown with YAML front matter."""
    cfg = model.config
    arch = cfg.arch
    title, arxiv = _PAPERS[arch]
    backbone, limits = _backbone(model)
    data_name = ((summary or {}).get("config") or {}).get("data")
    datasets = [os.path.basename(os.path.normpath(data_name))] if data_name else []
    pp = cfg.preprocess or {}
    crop = "no crop (aspect kept)" if pp.get("resize_mode") == "bagel" else f"centre crop {pp.get('size')}²"
    if arch == "unigendet":
        limits.append("License: the public UniGenDet code is MIT and its weights derive from "
                      "BAGEL-7B-MoT (Apache-2.0) and Qwen2.5; check the terms of the weights you loaded.")
    else:
        limits.append("License: the frozen CLIP backbone keeps its own weights' license.")
    out = [_front_matter(arch, license, datasets),
           f"# {title} detector (aigid)", "",
           f"An AI-generated-image detector: {title} (arXiv [{arxiv}](https://arxiv.org/abs/{arxiv})) "
           "as implemented by aigid. It outputs P(fake) per image; labels: 0 = real, 1 = fake.", "",
           "## Detector", "",
           "- " + ("prompt-tuned frozen CLIP (deep multimodal prompts, text-anchored SupCon); this "
                   "folder stores the prompts" if arch == "mirage" else
                   "MoT detection head `fake_cls_head` read after the question"
                   f" (verdict: {getattr(cfg, 'verdict', 'head')})"),
           f"- backbone: {backbone}", "",
           "## Training data", "", *_training(summary), "",
           "## Preprocessing", "",
           f"- resize: {pp.get('resize_mode', 'shortest')} to {pp.get('size')} "
           f"({pp.get('interpolation', 'bicubic')}), {crop}",
           f"- normalise: mean {pp.get('mean')}, std {pp.get('std')}",
           "- `detector.predict` applies it to paths, PIL images and uint8 arrays; give float "
           "tensors only when already preprocessed.", "",
           "## Metrics", "", *_metrics(summary), "",
           "## How to use", "", "```python", "import aigid",
           "detector = aigid.load_detector(\"path/to/this/folder\")  # local only, no download",
           "p_fake = detector.predict([\"image.jpg\"])", "```", "",
           "With transformers (`pip install aigid[hf]`): `pipeline(\"image-classification\", "
           "model=AigidForImageClassification.from_pretrained(folder), "
           "image_processor=AigidImageProcessor.from_pretrained(folder))` (from `aigid.hf`).", "",
           "## Intended use", "",
           "Screening images for likely AI generation, with a human reviewing what it flags and the "
           "threshold chosen on data like yours. Not proof of origin; not for decisions about a "
           "person without review.", "",
           "## Limits", "",
           "- Detectors generalise unevenly: accuracy drops on generators, post-processing "
           "(JPEG, resizing, screenshots) and content unlike the training data.",
           "- Scores are not calibrated probabilities unless calibrated on your data "
           "(`aigid calibrate`).",
           *[f"- {x}" for x in limits], ""]
    return "\n".join(out)


def write_model_card(folder: Union[str, os.PathLike], model: Any,
                     summary: Optional[Mapping[str, Any]] = None, license: Optional[str] = None) -> str:
    """Write ``README.md`` (the model card) into ``folder``; returns its path.

    Written to a temporary file and renamed, so a crash leaves the old card or the new one, with
    the mode the umask gives (``mkstemp`` alone would leave it 0600)."""
    path = os.path.join(os.fspath(folder), CARD_FILE)
    text = model_card(model, summary, license)
    fd, tmp = tempfile.mkstemp(prefix=".README-", suffix=".tmp", dir=os.fspath(folder))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

