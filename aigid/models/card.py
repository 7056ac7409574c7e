"""Hugging Face conventions for detector folders: HF-style config keys and a model card.

``config.json`` gets ``model_type`` / ``architectures`` / ``id2label`` / ``label2id`` beside
aigid's own fields, so hub tooling and ``transformers`` can tell what the folder holds; the
loaders drop them again (:func:`drop_hf_fields`), so folders written before and after load
alike. ``README.md`` is a model card: YAML front matter as the hub reads it, then what the
detector is, what it was trained on, how it preprocesses, how its scores are calibrated (when
``aigid calibrate`` stored a calibration in the config) and where it must not be trusted.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from aigid.models.checkpoint import write_text_atomically

__all__ = ["ID2LABEL", "LABEL2ID", "CARD_FILE", "hf_fields", "drop_hf_fields", "write_model_card",
           "refresh_card_calibration", "refresh_card_precision",
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


_UNCALIBRATED = ("Scores are not calibrated probabilities unless calibrated on your data "
                 "(`aigid calibrate`).")
_CALIBRATED_LIMIT_START = "Scores are calibrated on the data named under Calibration"


def _rule(rule: Optional[str]) -> str:
    """``Calibration.rule`` in words."""
    if rule and rule.startswith("fpr<="):
        return (f"`{rule}`: the lowest threshold whose false-positive rate on the calibration "
                f"set's real images is at most {rule[len('fpr<='):]}")
    if rule == "balanced":
        return "`balanced`: the threshold of the best balanced accuracy on the calibration set"
    if rule == "p>0.5":
        return "`p>0.5`: the default 0.5"
    return f"`{rule}`" if rule else "not recorded"


def _fitted_on(fitted: Mapping[str, Any]) -> str:
    if not fitted:
        return "not recorded"
    parts = []
    if "n_real" in fitted or "n_fake" in fitted:
        parts.append(f"{fitted.get('n_real', '?')} real and {fitted.get('n_fake', '?')} fake images")
    if fitted.get("data"):
        parts.append(f"from `{fitted['data']}`")
    if fitted.get("split"):
        parts.append(f"(split `{fitted['split']}`)")
    parts += [f"{k}: {v}" for k, v in fitted.items()
              if k not in ("n_real", "n_fake", "data", "split") and v is not None]
    return " ".join(parts) or "not recorded"


def _calibration(cfg: Any) -> tuple[list[str], str]:
    """The card's Calibration section (none without a stored calibration) and its Limits line."""
    stored = getattr(cfg, "calibration", None)
    if not stored:
        return [], _UNCALIBRATED
    from aigid.models.calibration import Calibration, stored_threshold

    cal = Calibration.from_dict(stored)
    if cal.method == "temperature":
        method = (f"temperature scaling, T = {cal.T:.6g}: calibrated P(fake) = "
                  "sigmoid(logit(raw P(fake)) / T) (raw P(fake) clipped to [1e-7, 1 - 1e-7])")
    else:
        method = (f"isotonic regression, {len(cal.x)} knots on raw P(fake) from {min(cal.x):.6g} "
                  f"to {max(cal.x):.6g} (calibrated values {min(cal.y):.6g} to {max(cal.y):.6g}): "
                  "linear between the knots, clipped to the end values outside them")
    lines = ["## Calibration", "",
             "Scores are calibrated: `detector.predict` returns calibrated P(fake) (fitted by "
             "`aigid calibrate` and stored in `config.json` under `calibration`), and so do the "
             "transformers pipeline (`aigid.export.hf`)"
             + (" and graphs written by `aigid export-model`" if cfg.arch == "mirage" else "")
             + "; `predict(..., calibrated=False)` gives the raw softmax.", "",
             f"- method: {method}",
             f"- threshold: {stored_threshold(cfg):.6g} (fake when P(fake) > threshold; "
             f"`detector.threshold`, `config.aigid_threshold` in `aigid.export.hf`), rule {_rule(cal.rule)}",
             f"- fitted on: {_fitted_on(cal.fitted_on)}"]
    if cfg.arch == "unigendet":
        lines.append("- applies to the detection head's scores (`verdict=\"head\"`); text verdicts "
                     "(1 / 0) are never calibrated")
    limit = (f"{_CALIBRATED_LIMIT_START}; on data unlike it they "
             "can be miscalibrated again: recalibrate on your data (`aigid calibrate`).")
    return lines + [""], limit


def _measured(record: Optional[Mapping[str, Any]], model: Any) -> list[str]:
    """The lines of the Precision section that come from the folder's ``precision.json``
    (``aigid agreement`` refreshes them; a card written by ``save_pretrained`` has none yet)."""
    from aigid.models.identity import model_id
    from aigid.models.precision_record import RECORD_FILE, bf16_verdict

    if not record:
        return ["- agreement with fp32 for these weights: `aigid agreement FOLDER DATA` measures it on "
                f"labelled images and writes `{RECORD_FILE}`; until it shows bf16 agrees, `auto` computes "
                "in fp32 on a CPU"]
    where = record.get("data") or "a labelled set"
    lines = [f"- measured on {record.get('compared')} labelled images of {where} (split "
             f"{record.get('split') or 'all'}), threshold {record.get('threshold'):.4g}, "
             f"{(record.get('measured_on') or {}).get('cpu', 'a CPU')}:"]
    for name, r in (record.get("precisions") or {}).items():
        lines.append(f"  - {name}: max |dP| {r['max_abs_dp']:.2g}, {100 * r['flip_fraction']:.2f}% of verdicts "
                     f"flip, AUROC {r['auroc_fp32']:.4f} -> {r['auroc']:.4f} ({r['d_auroc']:+.4f})")
    agrees, why = bf16_verdict(record, model_id(model))
    lines.append(f"- `auto` on a CPU with bf16 instructions: {'bf16' if agrees else 'fp32'} ({why})")
    return lines


def _precision(model: Any, record: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Which precision this card's numbers are at, and what the others cost in agreement."""
    ran = getattr(model, "precision", None) or "fp32 on a CPU, bf16 autocast on CUDA"
    return ["## Precision", "",
            f"- the numbers above: computed in {ran}",
            "- at inference, `aigid.load_detector(folder, precision=\"fp32\" | \"bf16\" | \"int8\" | \"auto\")`; "
            "in aigid's measurements bf16 moved P(fake) by at most 2.3e-3 and int8 (MiraGe, ONNX "
            "Runtime) by about 1e-2, so verdicts near the threshold can flip: check it at the "
            "precision you serve",
            *_measured(record, model), ""]


def model_card(model: Any, summary: Optional[Mapping[str, Any]] = None,
               license: Optional[str] = None) -> str:
    """The model card of ``model`` (a MiraGe or UniGenDet) as Markdown with YAML front matter."""
    cfg = model.config
    arch = cfg.arch
    title, arxiv = _PAPERS[arch]
    backbone, limits = _backbone(model)
    calibration, calibration_limit = _calibration(cfg)
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
           *calibration,
           *_precision(model),
           "## How to use", "", "```python", "import aigid",
           "detector = aigid.load_detector(\"path/to/this/folder\")  # local only, no download",
           "p_fake = detector.predict([\"image.jpg\"])", "```", "",
           "With transformers (`pip install aigid[hf]`): `pipeline(\"image-classification\", "
           "model=AigidForImageClassification.from_pretrained(folder), "
           "image_processor=AigidImageProcessor.from_pretrained(folder))` (from `aigid.export.hf`).", "",
           "## Intended use", "",
           "Screening images for likely AI generation, with a human reviewing what it flags and the "
           "threshold chosen on data like yours. Not proof of origin; not for decisions about a "
           "person without review.", "",
           "## Limits", "",
           "- Detectors generalise unevenly: accuracy drops on generators, post-processing "
           "(JPEG, resizing, screenshots) and content unlike the training data.",
           f"- {calibration_limit}",
           *[f"- {x}" for x in limits], ""]
    return "\n".join(out)


def write_model_card(folder: Union[str, os.PathLike], model: Any,
                     summary: Optional[Mapping[str, Any]] = None, license: Optional[str] = None) -> str:
    """Write ``README.md`` (the model card) into ``folder``; returns its path.

    Written to a temporary file and renamed, so a crash leaves the old card or the new one, with
    the mode the umask gives (``mkstemp`` alone would leave it 0600)."""
    text = model_card(model, summary, license)
    return _write_card(folder, text)


def _write_card(folder: Union[str, os.PathLike], text: str) -> str:
    return write_text_atomically(os.path.join(os.fspath(folder), CARD_FILE), text)


def refresh_card_calibration(folder: Union[str, os.PathLike], model: Any) -> str:
    """Bring the card in ``folder`` up to date with ``model.config.calibration`` without losing
    what only the card knows (the training summary ``save_pretrained`` was given): the
    Calibration section is replaced (or inserted before "How to use") and the Limits line about
    calibration rewritten; the rest of the text is kept. No card yet: a fresh one is written.
    ``aigid calibrate`` without ``--out`` changes only ``config.json``, so it calls this."""
    path = os.path.join(os.fspath(folder), CARD_FILE)
    if not os.path.isfile(path):
        return write_model_card(folder, model)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    section, limit = _calibration(model.config)
    _put_section(lines, "## Calibration", section)
    lines = [f"- {limit}" if ln == f"- {_UNCALIBRATED}" or
             ln.startswith(f"- {_CALIBRATED_LIMIT_START}") else ln for ln in lines]
    return _write_card(folder, "\n".join(lines))


def _put_section(lines: list[str], heading: str, section: list[str]) -> None:
    """Replace ``heading``'s section (up to the next heading) in ``lines`` with ``section``, in
    place; a new one goes before "How to use"; an empty ``section`` only removes the old."""
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[start:end]
    at = lines.index("## How to use") if "## How to use" in lines else len(lines)
    lines[at:at] = section


def refresh_card_precision(folder: Union[str, os.PathLike], model: Any, record: Mapping[str, Any]) -> str:
    """Bring the card's Precision section up to date with ``record`` (the ``precision.json``
    ``aigid agreement`` wrote), keeping the rest of the text; no card yet: a fresh one is written."""
    path = os.path.join(os.fspath(folder), CARD_FILE)
    if not os.path.isfile(path):
        write_model_card(folder, model)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    _put_section(lines, "## Precision", _precision(model, record))
    return _write_card(folder, "\n".join(lines))
