"""Calibration (issue 16): temperature and isotonic fits, thresholds for a target FPR or balanced
accuracy, their storage in both detectors' configs, calibrated ``predict``, ``calibrate`` and
the eval additions (ECE, Brier, accuracy at the stored threshold, plots)."""
import json
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import aigid
from aigid.evaluation import calibration as C
from aigid.data.labelled import LabelledImage
from aigid.evaluation.runner import calibrate, evaluate, write_plots
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(n: int, seed: int):
    """Labels drawn from sigmoid(true logit); scores sigmoid(3·true logit): overconfident by T=3."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < C._sigmoid(z)).astype(np.int64)
    return C._sigmoid(3 * z), y


# ---- fitting on known miscalibration -----------------------------------------------------------
def test_temperature_recovers_the_known_factor_and_ece_drops_on_held_out_scores():
    """Catches T applied the wrong way round (logit·T), labels swapped in the NLL or an
    unbounded/failed optimisation: the overconfidence factor is 3, and held-out ECE must fall."""
    s, y = _synthetic(20000, 0)
    cal = C.fit(s, y, "temperature")
    assert cal.T == pytest.approx(3.0, rel=0.05)
    hs, hy = _synthetic(20000, 1)
    before, after = C.expected_calibration_error(hs, hy), C.expected_calibration_error(cal.apply(hs), hy)
    assert before > 0.05 and after < 0.02
    assert C.brier_score(cal.apply(hs), hy) < C.brier_score(hs, hy)
    assert C.fit(s, y, "temperature").T == cal.T  # deterministic


def test_isotonic_lowers_held_out_ece_and_is_monotone():
    """Catches a PAV that leaves violators unpooled (a decreasing map) or knots that
    interpolate the wrong values: held-out ECE must fall and the map must not decrease."""
    s, y = _synthetic(20000, 2)
    cal = C.fit(s, y, "isotonic")
    assert np.all(np.diff(cal.x) >= 0) and np.all(np.diff(cal.y) >= 0)
    hs, hy = _synthetic(20000, 3)
    assert C.expected_calibration_error(hs, hy) > 0.05
    assert C.expected_calibration_error(cal.apply(hs), hy) < 0.02


def test_isotonic_matches_scikit_learn_on_tied_scores():
    """Catches a PAV that differs from the reference (ties not pooled by weight, steps kept at
    the wrong ends, no clipping outside the fitted range)."""
    sk = pytest.importorskip("sklearn.isotonic")
    rng = np.random.default_rng(4)
    for n, decimals, lo, hi in ((50, 1, 0, 1), (400, 2, 0, 1), (3000, 3, 0, 1), (800, 2, 0.3, 0.7)):
        s, y = _synthetic(n, int(rng.integers(1 << 30)))
        s = np.round(s, decimals)  # many ties
        s, y = s[(s >= lo) & (s <= hi)], y[(s >= lo) & (s <= hi)]
        y[s == s.min()], y[s == s.max()] = 1, 0  # end steps strictly inside (0, 1): clipping shows
        ref = sk.IsotonicRegression(out_of_bounds="clip").fit(s, y)
        kx, ky = C.fit_isotonic(s, y)
        q = np.r_[rng.random(2000), s, -0.5, 1.5]
        ours = C.Calibration("isotonic", x=kx, y=ky).apply(q)
        np.testing.assert_allclose(ours, ref.predict(q), atol=1e-12)
        np.testing.assert_allclose(kx, ref.X_thresholds_, atol=0)


def test_ece_and_brier_by_hand():
    """Catches ECE bins that are not equal-width right-closed, counts not weighting the bins, or
    a Brier score on the wrong class."""
    p, y = np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1])
    assert C.expected_calibration_error(p, y) == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)
    assert C.brier_score(p, y) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    # 0.4 = 6/15 closes bin 6 (right-closed, as Guo et al.'s lower < p <= upper); 0.45 is in bin 7
    assert C.expected_calibration_error([0.4, 0.45], [1, 0]) == pytest.approx((0.6 + 0.45) / 2)


# ---- thresholds ------------------------------------------------------------------------------
def test_fpr_threshold_is_the_smallest_meeting_the_target_under_score_gt_t():
    """Catches ``>=`` in the FPR count, an off-by-one k, or k taken from a product that rounded
    below an integer (0.29·100 = 28.999…)."""
    reals = np.arange(1, 101) / 100  # 0.01 … 1.00
    s, y = np.r_[reals, 0.5], np.r_[np.zeros(100, int), 1]
    for target in (0.0, 0.01, 0.2, 0.29, 0.5):
        t = C.fpr_threshold(s, y, target)
        fpr, _ = C.rates(s, y, t)
        assert fpr <= target
        assert C.rates(s, y, np.nextafter(t, -1))[0] > target  # any lower t breaks the target
    assert C.fpr_threshold(s, y, 0.29) == pytest.approx(0.71)
    with pytest.raises(ValueError):
        C.fpr_threshold(s, y, 1.0)


def test_stored_threshold_reaches_the_target_fpr_on_held_out_reals():
    """Catches a threshold chosen on raw instead of calibrated scores, or on the wrong class:
    on fresh reals its FPR must be the target within binomial sampling error."""
    target = 0.01
    s, y = _synthetic(20000, 5)
    cal = C.fit(s, y, "temperature", target_fpr=target)
    assert cal.rule == "fpr<=0.01"
    hs, hy = _synthetic(40000, 6)
    fpr, tpr = C.rates(cal.apply(hs).astype(np.float32), hy, cal.threshold)
    n_cal, n_held = int((y == 0).sum()), int((hy == 0).sum())
    sd = math.sqrt(target * (1 - target) * (1 / n_cal + 1 / n_held))
    assert abs(fpr - target) <= 4 * sd + 1 / n_cal
    assert tpr > 0.1  # it still catches fakes


def test_balanced_threshold_by_hand():
    """Catches balanced accuracy replaced by plain accuracy: with 2 reals and 10 fakes, plain
    accuracy is best at 0.1 (11/12) but balanced accuracy at 0.5 ((1 + 8/10) / 2)."""
    s = np.array([0.1, 0.5, 0.3, 0.4, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    y = np.array([0, 0] + [1] * 10)
    assert C.balanced_threshold(s, y) == 0.5
    cal = C.fit(s, y, "isotonic", balanced=True)
    assert cal.rule == "balanced"


def test_fit_refuses_one_class_and_both_rules():
    """Catches a silent fit on a set with no reals (no FPR can be measured)."""
    with pytest.raises(ValueError, match="reals and fakes"):
        C.fit([0.2, 0.9], [1, 1])
    with pytest.raises(ValueError, match="not both"):
        C.fit([0.2, 0.9], [0, 1], target_fpr=0.1, balanced=True)


def test_calibration_json_round_trip_and_nan_passes_through():
    """Catches a dict that loses fields through JSON, or NaN (a skipped image) turned into a
    number by the map."""
    s, y = _synthetic(500, 7)
    for method in C.METHODS:
        cal = C.fit(s, y, method, balanced=True)
        back = C.Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
        assert back == cal
        q = np.array([np.nan, 0.3, 0.999])
        assert np.isnan(back.apply(q)[0]) and np.array_equal(back.apply(q)[1:], cal.apply(q)[1:])
    assert set(C.Calibration("temperature", T=2.0).to_dict()) == {"method", "T", "fitted_on"}
    with pytest.raises(ValueError, match="unknown"):
        C.Calibration.from_dict({"method": "temperature", "T": 1.0, "bias": 0.1})
    assert C.stored_threshold({"calibration": {"method": "temperature", "T": 1.0, "threshold": 0.8}}) == 0.8
    assert C.stored_threshold({"calibration": None}) == C.stored_threshold(object()) == 0.5


# ---- in the detectors ------------------------------------------------------------------------
TEMPERATURE = {"method": "temperature", "T": 0.25, "threshold": 0.7, "rule": "fpr<=0.05"}


@pytest.fixture(scope="module")
def mirage_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mirage") / "det"
    aigid.MiraGe(aigid.MiraGeConfig.named("tiny"), seed=0).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["calibration"]  # as a folder saved before the field existed
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _images(root, n=6, seed=0):
    """``root/val/{real,fake}/*.png``: fakes carry a bright grid."""
    rng = np.random.default_rng(seed)
    for label in ("real", "fake"):
        os.makedirs(root / "val" / label)
        for i in range(n):
            img = rng.integers(0, 200, (32, 32, 3)).astype(np.uint8)
            if label == "fake":
                img[::4] = 255
            Image.fromarray(img).save(root / "val" / label / f"{i}.png")
    return root


def test_mirage_config_round_trip_and_calibrated_predict(mirage_dir, tmp_path):
    """Catches the config field not saved or not loaded, predict ignoring it (or applying it
    with calibrated=False), and ``threshold`` not reading the stored value."""
    det = aigid.load_detector(str(mirage_dir))
    assert det.config.calibration is None and det.threshold == 0.5  # a config from before the field
    px = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    raw = det.predict(px)
    det.config.calibration = dict(TEMPERATURE)
    det.save_pretrained(tmp_path / "cal")
    back = aigid.load_detector(str(tmp_path / "cal"))
    assert back.config.calibration == TEMPERATURE and back.threshold == 0.7
    assert torch.equal(back.predict(px, calibrated=False), raw)
    expected = torch.from_numpy(C.Calibration.from_dict(TEMPERATURE).apply(raw.double().numpy())).float()
    assert torch.equal(back.predict(px), expected)
    assert not torch.allclose(expected, raw)


def test_unigendet_config_round_trip_calibrates_the_head_only(tmp_path):
    """Catches UniGenDet's config dropping the field (from_dict rejects unknown keys), its head
    scores left raw, or calibration applied to text verdicts (1/0 would turn into other numbers)."""
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    model.config.calibration = dict(TEMPERATURE)
    model.save_pretrained(tmp_path / "u")
    raw_cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    raw_cfg.pop("calibration")
    assert UniGenDetConfig.from_dict(raw_cfg).calibration is None  # an older config.json loads
    back = UniGenDet.from_pretrained(tmp_path / "u").eval()
    assert back.config.calibration == TEMPERATURE and back.threshold == 0.7
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    raw = back.predict(px, calibrated=False)
    cal = C.Calibration.from_dict(TEMPERATURE).apply(raw.double().numpy())
    assert torch.equal(back.predict(px), torch.from_numpy(cal).float())
    back.explain = lambda *a, **k: ["This is a fake image.", "This is a real image."]
    assert back.predict(px, verdict="text").tolist() == [1.0, 0.0]


def test_calibrate_fits_stores_and_saves_into_the_folder(mirage_dir, tmp_path):
    """Catches calibrate fitting on already-calibrated scores, not storing the fit, a report
    whose threshold misses its own rule, and a config write that is not atomic (temp file left
    behind, 0600 mode) or loses the rest of the config."""
    root = _images(tmp_path / "data")
    det = aigid.load_detector(str(mirage_dir))
    det.config.calibration = dict(TEMPERATURE)  # an old calibration must not feed the new fit
    items = [LabelledImage(str(p), label, "") for label, sub in ((0, "real"), (1, "fake"))
             for p in sorted((root / "val" / sub).iterdir())]
    raw = det.predict([i.path for i in items], calibrated=False).numpy()
    report = calibrate(det, str(root), split="val", method="isotonic", target_fpr=0.2, progress=False)
    expected = C.fit(raw, [i.label for i in items], "isotonic", target_fpr=0.2)
    assert report["calibration"]["x"] == expected.x and report["threshold"] == expected.threshold
    assert det.config.calibration == report["calibration"] and det.threshold == report["threshold"]
    assert report["rule"] == "fpr<=0.2" and report["fpr"] <= 0.2 and report["n"] == 12
    assert report["after"]["brier"] <= report["before"]["brier"]  # isotonic, on its own fit set
    folder = tmp_path / "det"
    det.save_pretrained(folder)  # a folder to update, without the calibration yet
    (folder / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "calibration"}))
    os.chmod(folder / "config.json", 0o644)
    before = sorted(os.listdir(folder))
    C.save_calibration(str(folder), report["calibration"])
    assert sorted(os.listdir(folder)) == before
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(folder / "config.json").st_mode & 0o777) == 0o666 & ~umask
    back = aigid.load_detector(str(folder))
    assert back.threshold == report["threshold"]
    assert np.array_equal(back.predict([i.path for i in items]).numpy(),
                          expected.apply(raw).astype(np.float32))
    with pytest.raises(FileNotFoundError):
        C.save_calibration(str(tmp_path / "data"), report["calibration"])


def test_calibrate_refuses_text_verdicts():
    """Catches a calibration fitted on 1/0 text verdicts, which predict would never apply."""
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    model.config.verdict = "text"
    with pytest.raises(ValueError, match="head"):
        calibrate(model, [LabelledImage("/x.png", 0, "")])


# ---- eval ------------------------------------------------------------------------------------
def test_eval_reports_ece_brier_and_accuracy_at_the_stored_threshold(mirage_dir, tmp_path):
    """Catches eval ignoring the stored threshold (stored_* equal to acc@0.5), ECE/Brier on raw
    instead of predict's scores, and robustness entries without the stored-threshold numbers."""
    root = _images(tmp_path / "data", seed=1)
    det = aigid.load_detector(str(mirage_dir))
    det.config.calibration = dict(TEMPERATURE)
    items = [LabelledImage(str(p), label, "") for label, sub in ((0, "real"), (1, "fake"))
             for p in sorted((root / "val" / sub).iterdir())]
    s = det.predict([i.path for i in items]).numpy().astype(np.float64)
    raw = det.predict([i.path for i in items], calibrated=False).numpy().astype(np.float64)
    y = np.array([i.label for i in items])
    t = float(np.median(s))  # a stored threshold that splits the scores, unlike 0.5
    det.config.calibration["threshold"] = t
    r = evaluate(det, items, progress=False, robustness="jpeg90")
    o = r["overall"]
    assert o["stored_threshold"] == t and r["protocol"]["stored_rule"] == "fpr<=0.05"
    assert r["protocol"]["calibration"] == "temperature"
    assert o["stored_acc"] == pytest.approx(np.mean((s > t) == y))
    assert o["stored_real_acc"] == pytest.approx(np.mean(s[y == 0] <= t))
    assert o["acc"] == pytest.approx(np.mean((s > 0.5) == y))
    assert o["stored_real_acc"] != o["real_acc"]
    assert o["ece"] == pytest.approx(C.expected_calibration_error(s, y))
    assert o["ece"] != pytest.approx(C.expected_calibration_error(raw, y))
    assert o["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert r["mean_over_generators"]["stored_acc"] == o["stored_acc"]
    swept = r["robustness"]["jpeg90"]["overall"]
    assert swept["stored_threshold"] == t and 0 <= swept["stored_acc"] <= 1 and "ece" in swept


def test_plots_are_written_when_matplotlib_is_present(tmp_path):
    """Catches plots that are asked for but not written, or not PNG files."""
    pytest.importorskip("matplotlib")
    s, y = _synthetic(300, 8)
    paths = write_plots(str(tmp_path / "plots"), y, s, 0.6)
    assert [os.path.basename(p) for p in paths] == ["roc.png", "reliability.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_plots_dir_without_matplotlib_logs_and_goes_on(tmp_path, monkeypatch, caplog):
    """Catches a missing optional extra crashing eval instead of a notice."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    s, y = _synthetic(50, 9)
    with caplog.at_level(logging.WARNING, logger="aigid"):
        assert write_plots(str(tmp_path / "plots"), y, s) == []
    assert "matplotlib is not installed" in caplog.text
