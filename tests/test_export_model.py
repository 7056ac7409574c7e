"""Exported MiraGe (torch.export .pt2 and ONNX) scores exactly as ``predict`` does."""
import numpy as np
import pytest
import torch

from aigid.export.onnx import export_model
from aigid.models.mirage import MiraGe
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector():
    import copy
    from aigid.models.mirage import MiraGeConfig
    model = MiraGe(copy.deepcopy(MiraGeConfig.named("tiny")), seed=1).eval()
    with torch.no_grad():  # trained-looking prompts: P(fake) away from 0.5, so errors show
        for p in model.prompts.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    return model


def _pixels(n):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def test_torch_export_matches_predict_at_any_batch_size(detector, tmp_path):
    """Catches an exported graph that drifts from predict (anchors from stale prompts, the logit
    scale or the class index dropped, P(real) returned) or a batch size baked in at trace time."""
    path = export_model(detector, tmp_path / "m.pt2", format="torch-export")
    program = torch.export.load(path).module()
    for n in (1, 3):
        x = _pixels(n)
        got = program(x)
        assert got.shape == (n,)
        torch.testing.assert_close(got, detector.predict(x), atol=1e-6, rtol=0)
    assert detector.predict(_pixels(3)).std() > 1e-3  # the scores differ, so parity means something


def test_onnx_matches_predict_at_any_batch_size(detector, tmp_path):
    """Catches an ONNX graph that differs from predict or has a fixed batch dimension."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = export_model(detector, tmp_path / "m.onnx", format="onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    for n in (1, 3):
        x = _pixels(n)
        (got,) = session.run(None, {"pixels": x.numpy()})
        assert got.shape == (n,)
        np.testing.assert_allclose(got, detector.predict(x).numpy(), atol=1e-6, rtol=0)


def test_export_leaves_the_detector_usable_and_refuses_what_it_cannot(detector, tmp_path):
    """Catches an export that changes the detector it was given (weights, mode) and a UniGenDet
    or unknown format silently written as something wrong."""
    before = detector.predict(_pixels(2))
    export_model(detector, tmp_path / "m.pt2", format="torch-export")
    torch.testing.assert_close(detector.predict(_pixels(2)), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="format"):
        export_model(detector, tmp_path / "m.x", format="tflite")
    with pytest.raises(NotImplementedError, match="UniGenDet"):
        export_model(UniGenDet(UniGenDetConfig.named("tiny")), tmp_path / "u.pt2", format="torch-export")
    assert not (tmp_path / "u.pt2").exists()
