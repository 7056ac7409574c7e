"""Export a detector for serving without aigid's Python: ONNX or a ``torch.export`` program.

The exported graph takes preprocessed pixels (N, 3, S, S) — the output of the detector's
``preprocess``, S its crop size — and returns P(fake), (N,) float32: ``predict``'s numbers: when the
detector stores a calibration (``aigid calibrate``), the map is part of the graph
(``aigid.models.calibration.CalibrationMap``: temperature scaling or isotonic interpolation, in torch ops),
so the file returns calibrated P(fake) as ``predict`` does; ``calibrated=False`` exports the raw
softmax. The threshold is not in the graph: read it from the detector's config.json
(``calibration.threshold``; fake when P(fake) > it, 0.5 when none is stored). The batch size is
dynamic. MiraGe's class anchors come from the text tower, which does not depend
on the image: they are computed once here and stored in the graph as a constant, so the
exported model is the prompted vision tower, one matrix product and a softmax.

UniGenDet is not exportable: each image keeps its aspect (variable S), its VAE latents are
sampled with a per-image seeded generator, its SigLIP image is made by PIL from the 8-bit VAE
image, and the packed sequence layout is built in Python per batch.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Literal, Union

import torch
from torch import nn

from aigid.models.calibration import CalibrationMap
from aigid.models.mirage.exportable import PIXEL_SHAPES, ExportableMiraGe, example_pixels, write_onnx

__all__ = ["export_model", "ExportableMiraGe", "FORMATS"]

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torch-export")
Format = Literal["onnx", "torch-export"]


def _exportable(detector: Any, calibrated: bool = True) -> tuple[nn.Module, int]:
    arch = getattr(getattr(detector, "config", None), "arch", None)
    if arch == "unigendet":
        raise NotImplementedError("UniGenDet cannot be exported (variable-size images, sampled VAE "
                                  "latents, PIL resizing and a packed sequence built in Python); "
                                  "serve it with aigid")
    if arch != "mirage":
        raise ValueError(f"cannot export a {type(detector).__name__} (arch {arch!r})")
    return ExportableMiraGe(detector, calibrated).eval(), int(detector.config.preprocess["size"])


def export_model(detector: Any, path: Union[str, os.PathLike], format: Format = "onnx",
                 opset: int = 18, calibrated: bool = True) -> str:
    """Write ``detector`` (a MiraGe) to ``path`` as ``format``; returns the path.

    ``"torch-export"``: ``torch.export.export`` + ``torch.export.save`` (a ``.pt2`` file; load it
    with ``torch.export.load(path).module()``). ``"onnx"``: ``torch.onnx.export`` (needs the
    ``onnx`` and ``onnxscript`` packages; run it with onnxruntime). Input ``pixels`` (N, 3, S, S)
    float32, output ``p_fake`` (N,) float32; N is dynamic. The model is exported on CPU in
    float32 (``predict`` on CPU computes in float32 too). With a calibration stored in the
    detector's config the output is calibrated P(fake), ``predict``'s default; ``calibrated=False``
    exports the raw softmax (``predict(..., calibrated=False)``)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = os.fspath(path)
    module, size = _exportable(detector, calibrated)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for k, t in module.state_dict().items()
           if not k.startswith("calibration_map.")):  # the knots are float64 on purpose
        module = copy.deepcopy(module).to("cpu", torch.float32)  # the caller's detector stays as it is
        if module.calibration is not None:  # .to(float32) rounded the knots: rebuild them
            module.calibration_map = CalibrationMap(module.calibration)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if format == "torch-export":
        with torch.no_grad():
            program = torch.export.export(module, (example_pixels(size),), dynamic_shapes=PIXEL_SHAPES)
        torch.export.save(program, path)
    else:
        write_onnx(module, path, size, opset)
    cal = module.calibration
    if cal is not None:
        output = (f"calibrated P(fake), {cal.describe()} baked in (threshold {cal.threshold}, "
                  f"rule {cal.rule}: in config.json, not in the graph)")
    elif getattr(detector.config, "calibration", None):
        output = "raw P(fake): the stored calibration left out (calibrated=False)"
    else:
        output = "raw P(fake), no calibration stored"
    log.info("aigid: exported %s to %s (%s, input (N, 3, %d, %d) preprocessed pixels, output %s)",
             type(detector).__name__, path, format, size, size, output)
    return path
