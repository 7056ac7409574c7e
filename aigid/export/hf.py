"""aigid detectors in ``transformers``' image-classification pipeline (the ``[hf]`` extra).

    from transformers import pipeline
    from aigid.export.hf import AigidForImageClassification, AigidImageProcessor

    clf = pipeline("image-classification", model=AigidForImageClassification.from_pretrained(folder),
                   image_processor=AigidImageProcessor.from_pretrained(folder))
    clf("photo.jpg")  # [{"label": "fake", "score": p}, {"label": "real", "score": 1 - p}]

The model wraps the detector (no weights are converted: the folder is read by
``aigid.load_detector``) and returns two logits ordered as ``id2label`` ({0: real, 1: fake}) whose
softmax is ``[1 - P(fake), P(fake)]``, the detector's ``predict``. When the detector's config
stores a calibration (``aigid calibrate``), P(fake) is the calibrated one, as ``predict`` returns
it, and the logits are ``[0, logit(P(fake))]`` (P(fake) clipped to [1e-7, 1 - 1e-7] first, as
``aigid.models.calibration`` clips, so they stay finite); without one they are the detector's own
logits. ``model.config.aigid_threshold`` is the stored threshold (fake when the "fake" score >
it; 0.5 when none is stored): the pipeline reports scores, the decision is yours. The image
processor is the detector's own preprocessing. Loading is local only: a hub id is refused,
nothing is downloaded. The classes are registered with the ``Auto*`` factories under
``model_type`` ``aigid-mirage`` / ``aigid-unigendet`` (the keys ``save_pretrained`` writes), in
this process only.

Differences from ``predict``: the pipeline decodes paths itself (``transformers.image_utils.
load_image``: EXIF rotation, ``convert("RGB")``), so a file with transparency or a palette can
differ from ``predict(path)``; PIL RGB images give the same pixels. UniGenDet keeps each image's
aspect, so its processor batches one image, or images of one size, per call.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_base import ImageProcessingMixin
from transformers.modeling_outputs import ImageClassifierOutput

from aigid.models.calibration import _EPS, Calibration, stored_threshold
from aigid.models.card import ID2LABEL, LABEL2ID

__all__ = ["AigidConfig", "AigidForImageClassification", "AigidImageProcessor", "register"]

PathLike = Union[str, os.PathLike]


def _local_folder(path: PathLike) -> str:
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise OSError(f"{folder!r} is not a local detector folder; aigid.export.hf loads local folders only "
                      "(nothing is downloaded)")
    return folder


def _read_config(folder: str) -> dict[str, Any]:
    with open(os.path.join(_local_folder(folder), "config.json")) as f:
        return json.load(f)


def two_class_logits(detector: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits ordered [real, fake] (``ID2LABEL``); softmax gives ``predict``'s P(fake)."""
    arch = detector.config.arch
    if arch == "mirage":
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pixels.is_cuda):  # as predict
            return detector(pixels)["logits"].float()
    if arch == "unigendet":
        from aigid.models.unigendet.model import FAKE_CLASS, REAL_CLASS
        return detector.detect_logits(pixels)[:, [REAL_CLASS, FAKE_CLASS]]
    raise ValueError(f"unknown detector arch {arch!r}")


def calibrated_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """``two_class_logits`` through the stored calibration: ``[0, logit(P_cal)]`` (float32),
    whose softmax is ``[1 - P_cal, P_cal]``, P_cal ``predict``'s calibrated P(fake) (the softmax
    of ``logits`` in their own dtype, as ``predict`` takes it, then ``Calibration.apply``'s map
    in torch). ``logits`` unchanged when ``config`` stores no calibration."""
    stored = getattr(config, "calibration", None)
    if not stored:
        return logits
    p = Calibration.from_dict(stored).apply_torch(logits.softmax(-1)[:, 1])
    p = p.to(torch.float32 if p.device.type == "mps" else torch.float64).clamp(_EPS, 1 - _EPS)
    z = torch.log(p) - torch.log1p(-p)
    return torch.stack([torch.zeros_like(z), z], dim=-1).to(torch.float32)


# ---- config ---------------------------------------------------------------------------------
class AigidConfig(PretrainedConfig):
    """The HF view of a detector's config.json: aigid's fields (``arch``, ``preprocess`` ...) ride
    along as attributes. No ``__init__`` of ours: transformers 5 makes configs dataclasses and
    generates it; ``from_detector`` passes the label maps, and config.json carries them.

    ``aigid_threshold``: the threshold the detector stored with its calibration (``aigid
    calibrate``; 0.5 when none), fake when the pipeline's "fake" score > it. It is read when the
    wrapper is built; the logits follow the detector's config as it is at each call."""

    model_type = "aigid"


class MiraGeHFConfig(AigidConfig):
    model_type = "aigid-mirage"


class UniGenDetHFConfig(AigidConfig):
    model_type = "aigid-unigendet"


# ---- model ----------------------------------------------------------------------------------
class AigidForImageClassification(PreTrainedModel):
    """A detector as a ``PreTrainedModel``: ``forward(pixel_values)`` → logits [real, fake],
    calibrated when the detector stores a calibration (see the module's docstring)."""

    config_class = AigidConfig
    base_model_prefix = "detector"
    main_input_name = "pixel_values"

    def __init__(self, config: AigidConfig, detector: Optional[torch.nn.Module] = None):
        super().__init__(config)
        if detector is None:
            raise ValueError("build it with from_pretrained(folder) or from_detector(detector)")
        self.detector = detector
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The detector's weights come loaded: transformers must never re-initialise them."""

    @classmethod
    def from_detector(cls, detector: torch.nn.Module) -> "AigidForImageClassification":
        arch = detector.config.arch
        config_cls, model_cls = _CLASSES[arch]
        config = config_cls(arch=arch, preprocess=dict(detector.config.preprocess),
                            id2label={int(k): v for k, v in ID2LABEL.items()}, label2id=dict(LABEL2ID),
                            aigid_threshold=stored_threshold(detector.config),
                            problem_type="single_label_classification")  # softmax in the pipeline
        return model_cls(config, detector).eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *args: Any,
                        **kwargs: Any) -> "AigidForImageClassification":
        """A local aigid detector folder (``aigid.load_detector``); hub options are ignored and
        a hub id raises: nothing is downloaded. ``device`` / ``checkpoint`` pass through."""
        from aigid.models.registry import load_detector
        folder = _local_folder(pretrained_model_name_or_path)
        detector = load_detector(folder, device=kwargs.get("device"), checkpoint=kwargs.get("checkpoint"))
        return cls.from_detector(detector)

    def save_pretrained(self, save_directory: PathLike, *args: Any, **kwargs: Any) -> None:
        """The detector's own folder (config.json, safetensors, model card)."""
        self.detector.save_pretrained(save_directory)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                **kwargs: Any) -> ImageClassifierOutput:
        logits = two_class_logits(self.detector, pixel_values.to(self.detector.device))
        logits = calibrated_logits(self.detector.config, logits)  # predict's calibrated P(fake)
        loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class MiraGeForImageClassification(AigidForImageClassification):
    config_class = MiraGeHFConfig


class UniGenDetForImageClassification(AigidForImageClassification):
    config_class = UniGenDetHFConfig


_CLASSES = {"mirage": (MiraGeHFConfig, MiraGeForImageClassification),
            "unigendet": (UniGenDetHFConfig, UniGenDetForImageClassification)}


# ---- image processor -------------------------------------------------------------------------
class AigidImageProcessor(ImageProcessingMixin):
    """The detector's preprocessing (``config.preprocess``) as an image processor: images in any
    form ``predict`` takes → ``{"pixel_values": (N, 3, H, W)}``, the pixels ``predict`` uses."""

    model_input_names = ["pixel_values"]

    def __init__(self, preprocess: Optional[dict[str, Any]] = None, **kwargs: Any):
        super().__init__(**kwargs)
        if not preprocess:
            raise ValueError("AigidImageProcessor needs the detector's preprocess dict")
        self.preprocess_config = dict(preprocess)
        self._transform = None

    @classmethod
    def from_detector(cls, detector: Any) -> "AigidImageProcessor":
        return cls(dict(detector.config.preprocess))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *args: Any,
                        **kwargs: Any) -> "AigidImageProcessor":
        """A local detector folder: the preprocessing its config.json records. A MiraGe folder
        saved before ``preprocess`` was written out is read through the detector itself."""
        folder = _local_folder(pretrained_model_name_or_path)
        preprocess = _read_config(folder).get("preprocess")
        if not preprocess or "size" not in preprocess or "mean" not in preprocess:
            from aigid.models.registry import load_detector
            preprocess = load_detector(folder).config.preprocess
        return cls(dict(preprocess))

    def to_dict(self) -> dict[str, Any]:
        return {"image_processor_type": type(self).__name__, "preprocess": self.preprocess_config}

    def __call__(self, images: Any, return_tensors: Optional[str] = "pt", **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images: Any, return_tensors: Optional[str] = "pt", **kwargs: Any) -> BatchFeature:
        from aigid.data.transforms import eval_transform, prepare
        if self._transform is None:
            self._transform = eval_transform(self.preprocess_config)
        pixels = prepare(images, self._transform, errors="raise").stacked("cpu")
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageClassification`` know the aigid model types (this
    process only; nothing is pushed anywhere). Idempotent. ``AutoImageProcessor`` takes only
    ``BaseImageProcessor`` backends, so the pipeline needs ``image_processor=`` given."""
    for config_cls, model_cls in _CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, model_cls, exist_ok=True)


register()
