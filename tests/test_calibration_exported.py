"""A stored calibration reaches every way of serving a detector: the torch map
(``Calibration.apply_torch`` / ``CalibrationMap``) agrees with ``Calibration.apply``; the
transformers pipeline (``aigid.export.hf``) and the exported graphs (torch.export, ONNX) return the
calibrated P(fake) ``predict`` returns; the model card states the calibration. Without one,
everything stays raw, as before."""
import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.evaluation import calibration as C
from aigid.export.onnx import ExportableMiraGe, export_model
from aigid.models.mirage import MiraGe, MiraGeConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FITTED_ON = {"n_real": 7, "n_fake": 9, "data": "/data/held-out", "split": "val"}


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def _pixels(n):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    """A tiny MiraGe with P(fake) spread out (perturbed prompts), saved with no calibration."""
    model = MiraGe(copy.deepcopy(MiraGeConfig.named("tiny")), seed=1).eval()
    with torch.no_grad():
        for p in model.prompts.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    folder = tmp_path_factory.mktemp("raw") / "det"
    model.save_pretrained(folder)
    return folder, model


def _calibrations(raw_scores):
    """A sharpening temperature, and isotonic knots between the sorted raw scores r0 < ... < r4
    (so r0 is clipped at the low end, r4 at the high end, the rest interpolated) with a flat
    step and moderate slopes."""
    r = np.sort(raw_scores)
    assert len(r) == 5 and np.all(np.diff(r) > 0)
    lo, q1, q2, hi = (r[0] + r[1]) / 2, (r[1] + r[2]) / 2, (r[2] + r[3]) / 2, (r[3] + r[4]) / 2
    mid = (lo + hi) / 2
    y = [float(np.clip(0.5 + 4 * (v - mid), 0, 1)) for v in (lo, q1, q2, hi)]
    y[2] = y[1]  # a flat step, as isotonic fits make
    return {
        "temperature": {"method": "temperature", "T": 0.4, "threshold": 0.83, "rule": "balanced",
                        "fitted_on": FITTED_ON},
        "isotonic": {"method": "isotonic", "x": [lo, q1, q2, hi], "y": y, "threshold": 0.55,
                     "rule": "fpr<=0.05", "fitted_on": FITTED_ON},
    }


@pytest.fixture(scope="module")
def calibrated(raw_dir, tmp_path_factory):
    """{method: (folder, calibration dict)}: copies of the raw folder with a calibration stored
    the way ``aigid calibrate`` stores it (``save_calibration``: config.json only)."""
    folder, model = raw_dir
    out = {}
    for method, cal in _calibrations(model.predict(_pixels(5)).double().numpy()).items():
        dst = tmp_path_factory.mktemp(method) / "det"
        shutil.copytree(folder, dst)
        C.save_calibration(str(dst), cal)
        out[method] = dst, cal
    return out


def _load(folder):
    return MiraGe.from_pretrained(folder).eval()


# ---- the torch map ------------------------------------------------------------------------------
def test_torch_map_agrees_with_apply_at_the_ends_on_knots_ties_and_nan():
    """Catches a torch map that differs from the numpy one predict uses: the segment taken with
    the wrong side (knot values or repeated knots off by one), no clipping outside the knots
    (extrapolated lines), logit(p) not clipped at 1e-7 (p = 0 or 1 give 0 / 1 instead of
    apply's finite-logit values), T multiplied, float32 working precision, NaN turned into a
    number, or the dtype changed."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 3000)
    s = np.round(C._sigmoid(3 * z), 2)  # many tied scores
    y = (rng.random(3000) < C._sigmoid(z)).astype(np.int64)
    cals = [C.fit(s, y, "temperature"), C.fit(s, y, "isotonic"),
            C.Calibration("temperature", T=3.0), C.Calibration("temperature", T=0.3),
            C.Calibration("isotonic", x=[0.2, 0.2, 0.5, 0.5, 0.8], y=[0.1, 0.3, 0.4, 0.6, 0.9]),
            C.Calibration("isotonic", x=[0.3, 0.6], y=[0.25, 0.25])]
    assert len(cals[1].x) > 10
    for cal in cals:
        knots = np.asarray(cal.x or [], dtype=np.float64)
        q = np.r_[np.nan, 0.0, 1.0, -0.5, 1.5, 1e-9, 1 - 1e-9, 0.5, knots,
                  np.nextafter(knots, -1), np.nextafter(knots, 2), s[:500], rng.random(500)]
        q = q[:len(q) // 2 * 2]  # even, for the (2, -1) view below
        ref = cal.apply(q)
        got64 = cal.apply_torch(torch.from_numpy(q))
        assert got64.dtype == torch.float64
        np.testing.assert_allclose(got64.numpy(), ref, atol=1e-12, rtol=0)  # NaN where ref is NaN
        assert np.isnan(got64[0].item())
        q32 = torch.from_numpy(q.astype(np.float32))
        got32 = cal.apply_torch(q32)
        assert got32.dtype == torch.float32
        # predict's exact numbers: float32 scores through apply (float64), rounded to float32
        np.testing.assert_allclose(got32.numpy(), cal.apply(q32.double().numpy()).astype(np.float32),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(C.CalibrationMap(cal)(q32.reshape(2, -1)).flatten(), got32,
                                   atol=0, rtol=0, equal_nan=True)  # any shape


def test_single_knot_isotonic_keeps_nan_in_numpy_and_torch():
    """Catches a skipped image (NaN score) getting a calibrated score when every held-out score
    was equal, so the isotonic fit has one knot: np.interp maps NaN to that knot's value."""
    cal = C.Calibration("isotonic", x=[0.3], y=[0.8])
    p = np.array([np.nan, 0.1, 0.3, 0.9])
    want = np.array([np.nan, 0.8, 0.8, 0.8])
    np.testing.assert_array_equal(cal.apply(p), want)
    np.testing.assert_array_equal(cal.apply_torch(torch.tensor(p)).numpy(), want)


# ---- the transformers pipeline ------------------------------------------------------------------
@pytest.mark.parametrize("method", C.METHODS)
def test_pipeline_gives_predicts_calibrated_score(calibrated, raw_dir, method):
    """Catches the HF wrapper returning the raw softmax while predict returns calibrated scores,
    logits in the wrong order ([logit, 0]: the calibrated score labelled "real"), a calibration
    applied twice, or the stored threshold missing from the HF config."""
    pytest.importorskip("transformers")
    from transformers import pipeline
    from aigid.export.hf import AigidForImageClassification, AigidImageProcessor
    folder, cal = calibrated[method]
    model = AigidForImageClassification.from_pretrained(folder)
    assert model.config.aigid_threshold == cal["threshold"]
    clf = pipeline("image-classification", model=model,
                   image_processor=AigidImageProcessor.from_pretrained(folder))
    images = _images(6)
    detector = _load(folder)
    expected = detector.predict(images)
    raw = raw_dir[1].predict(images)
    assert (expected - raw).abs().max() > 0.05  # the calibration moves the scores
    for img, p in zip(images, expected.tolist()):
        scores = {o["label"]: o["score"] for o in clf(img)}
        assert scores["fake"] == pytest.approx(p, abs=1e-5)
        assert scores["real"] == pytest.approx(1 - p, abs=1e-5)


def test_pipeline_calibrates_unigendet_head_scores(tmp_path):
    """Catches the calibrated logits built for MiraGe only, or from UniGenDet's head in its own
    class order (fake = 0) instead of id2label's [real, fake]."""
    pytest.importorskip("transformers")
    from transformers import pipeline
    from aigid.export.hf import AigidForImageClassification, AigidImageProcessor
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    model.config.calibration = {"method": "temperature", "T": 0.2, "threshold": 0.6, "rule": "balanced"}
    model.save_pretrained(tmp_path)
    clf = pipeline("image-classification", model=AigidForImageClassification.from_pretrained(tmp_path),
                   image_processor=AigidImageProcessor.from_pretrained(tmp_path))
    assert clf.model.config.aigid_threshold == 0.6
    img = _images(1)[0]
    p, raw = model.predict(img).item(), model.predict(img, calibrated=False).item()
    assert abs(p - raw) > 1e-3
    assert {o["label"]: o["score"] for o in clf(img)}["fake"] == pytest.approx(p, abs=1e-5)


# ---- the exported graphs ------------------------------------------------------------------------
@pytest.mark.parametrize("method", C.METHODS)
@pytest.mark.parametrize("format", ["torch-export", "onnx"])
def test_exported_graph_gives_predicts_calibrated_score(calibrated, raw_dir, method, format,
                                                         tmp_path, caplog):
    """Catches an export that bakes in the raw softmax while predict calibrates, interpolation
    without clipping outside the knots (those ops trace, but give other numbers), the map
    applied to P(real), a calibration that one of the exporters cannot take or a batch size
    baked in with it, or an export log that does not say what was baked in."""
    if format == "onnx":
        pytest.importorskip("onnxscript")
        ort = pytest.importorskip("onnxruntime")
    folder, cal = calibrated[method]
    detector = _load(folder)
    with caplog.at_level(logging.INFO, logger="aigid"):
        path = export_model(detector, tmp_path / f"m.{'onnx' if format == 'onnx' else 'pt2'}", format=format)
    assert f"{method} " in caplog.text and "baked in" in caplog.text
    if format == "onnx":
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"pixels": x.numpy()})[0])  # noqa: E731
    else:
        run = torch.export.load(path).module()
    for n in (1, 5):
        x = _pixels(n)
        got = run(x)
        assert got.shape == (n,) and got.dtype == torch.float32
        torch.testing.assert_close(got, detector.predict(x), atol=1e-5, rtol=0)
    x = _pixels(5)
    assert (detector.predict(x) - raw_dir[1].predict(x)).abs().max() > 0.05
    if method == "isotonic":  # both ends clipped and the inside interpolated, in this batch
        raw = raw_dir[1].predict(x).numpy()
        assert (raw < cal["x"][0]).any() and (raw > cal["x"][-1]).any()
        assert ((raw > cal["x"][0]) & (raw < cal["x"][-1])).any()


def test_without_calibration_everything_stays_raw(raw_dir, calibrated, caplog):
    """Catches a calibration applied where none is stored (logits rewritten to [0, logit p],
    a default map in the graph), calibrated=False ignored by the export, or the card losing
    today's "not calibrated" line for an uncalibrated detector."""
    pytest.importorskip("transformers")
    from aigid.export.hf import AigidForImageClassification, two_class_logits
    folder, model = raw_dir
    hf = AigidForImageClassification.from_pretrained(folder)
    x = _pixels(3)
    assert hf.config.aigid_threshold == 0.5
    with torch.no_grad():
        assert torch.equal(hf(pixel_values=x).logits, two_class_logits(hf.detector, x))
    module = ExportableMiraGe(_load(folder)).eval()
    assert module.calibration_map is None
    with torch.no_grad():
        torch.testing.assert_close(module(x), model.predict(x), atol=1e-6, rtol=0)
    calibrated_detector = _load(calibrated["isotonic"][0])
    with caplog.at_level(logging.INFO, logger="aigid"):
        off = ExportableMiraGe(calibrated_detector, calibrated=False).eval()
    assert off.calibration_map is None
    with torch.no_grad():
        torch.testing.assert_close(off(x), calibrated_detector.predict(x, calibrated=False), atol=1e-6, rtol=0)
    card = (folder / "README.md").read_text()
    assert "Scores are not calibrated probabilities unless calibrated on your data" in card
    assert "## Calibration" not in card


# ---- the model card -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", C.METHODS)
def test_card_states_the_stored_calibration(calibrated, method, tmp_path):
    """Catches a card that still says scores are not calibrated when a calibration is stored, or
    one that leaves out the method's parameters (T, the knots), the threshold, its rule or what
    it was fitted on."""
    folder, cal = calibrated[method]
    detector = _load(folder)
    detector.save_pretrained(tmp_path / "out")  # aigid calibrate --out: a fresh card
    card = (tmp_path / "out" / "README.md").read_text()
    assert "not calibrated probabilities" not in card
    section = card.split("## Calibration\n", 1)[1].split("\n## ", 1)[0]
    assert "Scores are calibrated" in section
    if method == "temperature":
        assert "temperature scaling, T = 0.4" in section
    else:
        assert "isotonic regression, 4 knots" in section and f"{cal['x'][0]:.6g}" in section
    assert f"threshold: {cal['threshold']:.6g}" in section and f"`{cal['rule']}`" in section
    assert "7 real and 9 fake images from `/data/held-out` (split `val`)" in section
    assert "Scores are calibrated on the data named under Calibration" in card.split("## Limits", 1)[1]
    for heading in ("## Metrics", "## How to use", "## Intended use", "## Limits"):
        assert heading in card  # the rest of the card is kept
    assert json.loads((tmp_path / "out" / "config.json").read_text())["calibration"] == cal
