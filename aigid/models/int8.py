"""int8 on a CPU: ONNX Runtime's dynamic quantisation of MiraGe's exported vision path.

torch's own dynamic quantisation (``torch.ao.quantization.quantize_dynamic``) is deprecated in
torch 2.14 (its quantized tensors are to be removed), so the int8 backend is ONNX Runtime, already
``[export]``'s dependency: the prompted vision tower with its frozen anchors
(:class:`~aigid.models.mirage.exportable.ExportableMiraGe`, uncalibrated: the model applies its
calibration after, as for every precision) is exported to ONNX, its weights quantised to int8
(``quantize_dynamic``, QInt8: activations quantised per batch at run time), and run by an
``InferenceSession`` on this process's threads. UniGenDet cannot be exported, so it has no int8.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Callable

import torch

from aigid.models.mirage.exportable import ExportableMiraGe, write_onnx

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _root_logging_untouched():
    """ONNX Runtime's quantiser logs through ``logging.warning``, which configures the root logger
    when it has no handler: every later record of the process would then print twice. A handler
    held on the root while it runs keeps it unconfigured (its notice goes to our debug log)."""
    class ToDebug(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.debug("onnxruntime: %s", record.getMessage())

    handler = ToDebug()
    logging.root.addHandler(handler)
    try:
        yield
    finally:
        logging.root.removeHandler(handler)


ORT_PACKAGES = "pip install 'aigid[export]' (onnx, onnxscript, onnxruntime)"


def int8_forward(detector: Any, quantize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """pixels (N, 3, S, S) → raw P(fake) (N,) float32, computed by an int8 ONNX Runtime session
    (``quantize=False``: the same session on the fp32 graph, the benchmarks' ONNX Runtime peer)."""
    if getattr(detector.config, "arch", None) != "mirage":
        raise ValueError("precision='int8' runs MiraGe's exported graph; UniGenDet cannot be exported "
                         "(use fp32 or bf16)")
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise ImportError(f"precision='int8' needs ONNX Runtime: {ORT_PACKAGES}") from err
    module = ExportableMiraGe(detector, calibrated=False).eval()
    size = int(detector.config.preprocess["size"])
    with tempfile.TemporaryDirectory(prefix="aigid-int8-") as folder:
        fp32, int8 = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.int8.onnx")
        write_onnx(module, fp32, size)
        if quantize:
            with _root_logging_untouched():
                quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # no spin-waiting after a run: the decode threads and torch share these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(int8 if quantize else fp32, options, providers=["CPUExecutionProvider"])

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out = session.run(["p_fake"], {"pixels": pixels.detach().to("cpu", torch.float32).numpy()})[0]
        return torch.from_numpy(out).float()

    return forward
