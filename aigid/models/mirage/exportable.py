"""MiraGe's inference path as a graph-exportable module, and writing it as ONNX: used by
``aigid export-model`` (:mod:`aigid.export.onnx`) and by the int8 backend (:mod:`aigid.models.int8`)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from aigid.models.calibration import Calibration, CalibrationMap

PIXEL_SHAPES = {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}  # the batch size is dynamic


def example_pixels(size: int) -> torch.Tensor:
    return torch.zeros(2, 3, size, size)  # 2, not 1: a batch of 1 would be specialised


class ExportableMiraGe(nn.Module):
    """pixels (N, 3, S, S) → P(fake) (N,): MiraGe's inference path with the anchors and the
    vision prompts frozen, then the stored calibration if any (and ``calibrated``). Only the
    vision tower is a submodule: the text tower stays out of the exported file."""

    def __init__(self, detector: nn.Module, calibrated: bool = True):
        super().__init__()
        self.visual = detector.clip.visual              # registered: its weights go in the graph
        self._encoder = [detector.vision_encoder]       # a list: not a second copy of the tower
        with torch.no_grad():
            # buffers, so the exporters store them as constants of the graph
            self.register_buffer("anchors", detector.anchors().detach().clone())           # (C, E)
            self.register_buffer("vision_prompts", detector.prompts.vision().detach().clone())
            self.register_buffer("logit_scale", detector.clip.logit_scale.exp().float().detach().clone())
        self.fake_index = 1  # MiraGe's class order: ["Real", "Fake"]
        stored = getattr(detector.config, "calibration", None) if calibrated else None
        self.calibration = Calibration.from_dict(stored) if stored else None
        # a submodule, so isotonic knots are buffers: constants of the exported graph
        self.calibration_map = CalibrationMap(self.calibration) if self.calibration else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self._encoder[0](pixels, self.vision_prompts).float(), dim=-1)
        logits = self.logit_scale * h @ self.anchors.T  # predict's expression, same order
        p = logits.float().softmax(-1)[:, self.fake_index]
        return p if self.calibration_map is None else self.calibration_map(p)


def write_onnx(module: nn.Module, path: str | os.PathLike, size: int, opset: int = 18) -> str:
    """``module`` (pixels (N, 3, size, size) → P(fake) (N,)) as one ONNX file (``torch.onnx``, dynamo)."""
    with torch.no_grad():
        torch.onnx.export(module, (example_pixels(size),), os.fspath(path), input_names=["pixels"],
                          output_names=["p_fake"], dynamic_shapes=PIXEL_SHAPES, opset_version=opset,
                          dynamo=True, external_data=False, verbose=False)
    return os.fspath(path)
