"""aigid's numbers sit beside UnivFD's, SIDBench's and DeepfakeBench's: each convention is checked
against a re-derivation of that framework's formula (scikit-learn where they call it), on tied
and untied scores, and each report format against the files the framework writes."""
import csv
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (accuracy_score, auc, average_precision_score, confusion_matrix,
                             roc_auc_score, roc_curve)

import aigid
from aigid.data.labelled import LabelledImage
from aigid.data.perturb import Perturbation
from aigid.evaluation.formats import FORMATS, write_report
from aigid.evaluation.runner import _metrics
from aigid.evaluation.metrics import binary_metrics, equal_error_rate, is_fake, oracle_accuracy
from aigid.scanning.local import scan
from aigid.scanning.store import ResultRow, ResultStore, label_of


def _scores(seed: int, n: int = 200, tied: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.random(n) * 0.8 + 0.25 * y
    return y, (np.round(s * 8) / 8 if tied else s)  # eighths: many ties, 0.5 among them


# ---------------------------------------------------------------- fake means score > threshold


def test_a_score_on_the_threshold_is_real_in_metrics_and_labels():
    """Catches ``>=`` in any place that decides fake: binary_metrics' accuracies, is_fake, the
    store's label_of (scan, export and Ray labels go through it)."""
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.2, 0.9])  # one real and one fake exactly on 0.5
    m = binary_metrics(y, s, 0.5)
    assert (m["real_acc"], m["fake_acc"], m["acc"]) == (1.0, 0.5, 0.75)
    assert is_fake(s, 0.5).tolist() == [False, False, False, True]
    assert label_of(0.5, 0.5) == 0 and label_of(np.nextafter(0.5, 1), 0.5) == 1


def test_store_rows_and_export_label_a_score_on_the_threshold_real(tmp_path):
    """Catches the store deriving labels with ``>=`` (rows and exported CSV disagreeing with
    UnivFD/SIDBench/DeepfakeBench on a score equal to the threshold)."""
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.write([ResultRow("/on.png", "m", "aa" * 16, 1, 0.25, None, None, 1.0),
                     ResultRow("/above.png", "m", "bb" * 16, 1, 0.75, None, None, 1.0)])
        assert {r.id: r.label for r in store.rows(threshold=0.25)} == {"/on.png": 0, "/above.png": 1}
        store.export(tmp_path / "r.csv", threshold=0.75)
    with open(tmp_path / "r.csv", newline="") as f:
        assert {r["id"]: r["label"] for r in csv.DictReader(f)} == {"/on.png": "0", "/above.png": "0"}


def test_scan_labels_an_image_scored_exactly_at_the_threshold_real(tmp_path):
    """Catches the scanner labelling with its own ``>=`` instead of the shared rule: rescanning
    with the threshold set to an image's own score must call that image real."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    torch.manual_seed(0)
    det_dir = tmp_path / "det"
    aigid.MiraGe(aigid.MiraGeConfig.named("tiny"), seed=0).save_pretrained(det_dir)
    detector = aigid.load_detector(str(det_dir))
    kw = dict(batch_size=4, num_workers=0, progress=False, decoder="pil")
    scores = {r.id: r.score for r in scan([tmp_path], detector, threshold=0.5, **kw)}
    some_id, t = sorted(scores.items())[0]
    labels = {r.id: r.label for r in scan([tmp_path], detector, threshold=t, **kw)}
    assert labels[some_id] == 0
    assert all(labels[i] == int(s > t) for i, s in scores.items())


# ------------------------------------------------------------------- metrics vs re-derivations


@pytest.mark.parametrize("seed,tied", [(0, True), (1, True), (2, False), (3, False)])
def test_ap_auroc_and_accuracies_match_the_frameworks_formulas(seed, tied):
    """Catches AP/AUROC drifting from scikit-learn's on ties, and per-class accuracies that count
    a different side of the threshold than UnivFD's ``calculate_acc`` / SIDBench's
    ``calculate_for_threshold`` (``y_pred > thres`` per class)."""
    y, s = _scores(seed, tied=tied)
    assert tied == bool(np.any(s == 0.5))  # the tied sets put scores right on the threshold
    m = binary_metrics(y, s, 0.5)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["real_acc"] == accuracy_score(y[y == 0], s[y == 0] > 0.5)
    assert m["fake_acc"] == accuracy_score(y[y == 1], s[y == 1] > 0.5)
    assert m["acc"] == accuracy_score(y, s > 0.5)


def _deepfakebench_eer(y, s) -> float:
    """training/metrics/utils.py get_test_metrics, re-derived."""
    fpr, tpr, _ = roc_curve(y, s, pos_label=1)
    return float(fpr[np.nanargmin(np.absolute((1 - tpr) - fpr))])


@pytest.mark.parametrize("seed,tied", [(0, True), (1, True), (2, True), (3, False), (4, False)])
def test_eer_is_deepfakebench_on_tied_and_untied_scores(seed, tied):
    """Catches an EER that averages FPR and FNR, or that searches every ROC point instead of
    scikit-learn's ``drop_intermediate`` curve (both differ from DeepfakeBench by up to 0.03)."""
    y, s = _scores(seed, n=60, tied=tied)
    assert equal_error_rate(y, s) == _deepfakebench_eer(y, s)


def test_eer_sees_only_the_points_scikit_learn_keeps():
    """Catches an EER over all ROC points: on four tied real/fake pairs every point lies on the
    diagonal, scikit-learn keeps (0,0), (.25,.25) and (1,1), and DeepfakeBench reports 0.25 where
    an all-points search gives 0.5."""
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    s = np.array([0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6])
    assert _deepfakebench_eer(y, s) == 0.25 == equal_error_rate(y, s)
    y2, s2 = np.array([1, 1, 1, 0, 1, 0]), np.array([0.25, 0.75, 0.75, 0.25, 0.5, 0.5])
    assert equal_error_rate(y2, s2) == _deepfakebench_eer(y2, s2) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_oracle_is_at_least_univfds_and_sidbenchs_searches(seed):
    """Catches an oracle threshold that is wrong under ``>`` (its accuracy not reproducible at the
    threshold it returns) or worse than what UnivFD's or SIDBench's own search finds."""
    y, s = _scores(seed, n=80)
    acc, t = oracle_accuracy(y, s)
    assert accuracy_score(y, s > t) == acc
    sid = max(accuracy_score(y, s > g) for g in np.linspace(0, 1, 100))  # find_best_acc_threshold
    univfd = max(accuracy_score(y, s > u) for u in s)  # find_best_threshold's candidates, then >
    assert acc >= sid and acc >= univfd
    assert acc == max(accuracy_score(y, s > u) for u in [*s, -np.inf])


# ------------------------------------------------------------------------ perturbations


def _univfd_blur(img: Image.Image, sigma: float) -> np.ndarray:
    """validate.py gaussian_blur re-derived without scipy: the normalised Gaussian of radius
    int(4σ + 0.5), half-sample-symmetric edges, one pass per axis (rows then columns), each
    pass truncated to uint8 as scipy writes into the uint8 ``output=``."""
    arr = np.asarray(img).astype(np.float64)
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = arr
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = np.trunc(sum(k[j] * np.take(p, np.arange(j, j + n), axis=axis) for j in range(2 * r + 1)))
    return out.astype(np.uint8)


@pytest.mark.parametrize("sigma", [2, 4, 1.5])
def test_blur_is_univfd_sidbench_gaussian_filter(sigma):
    """Catches PIL's box-approximated GaussianBlur (up to ~15 grey levels off) or scipy called
    another way (float output rounded once, another mode or truncate) in the robustness sweep."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    out = np.asarray(Perturbation(f"blur{sigma:g}")(img))
    assert out.dtype == np.uint8 and out.shape == (30, 41, 3)
    assert np.array_equal(out, _univfd_blur(img, sigma))


@pytest.mark.parametrize("quality", [95, 30])
def test_jpeg_is_pillows_default_encoder_at_that_quality(quality):
    """Catches a JPEG step that departs from UnivFD/SIDBench ``png2jpg`` (Pillow defaults: 4:2:0
    subsampling, standard tables), e.g. subsampling off or another quality scale."""
    import io

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="jpeg", quality=quality, subsampling="4:2:0")
    expected = np.array(Image.open(io.BytesIO(buf.getvalue())))
    assert np.array_equal(np.asarray(Perturbation(f"jpeg{quality}")(img)), expected)


# ------------------------------------------------------------------------------ reports


def _result(with_sweep: bool = True):
    """An evaluate() result built from known scores: two generators, more reals than fakes (so
    real and fake counts cannot stand in for each other), ties at 0.5."""
    rng = np.random.default_rng(3)
    gens = ["adm"] * 20 + ["sd"] * 20
    y = np.array([int(i % 3 == 1) for i in range(40)])
    s = np.round((rng.random(40) * 0.7 + 0.2 * y) * 8) / 8
    s[:2] = 0.5  # one real and one fake of adm on the threshold
    assert y[0] == 0 and y[1] == 1
    items = [LabelledImage(f"/{i}.png", int(y[i]), gens[i]) for i in range(40)]
    kept = np.arange(40)
    result = _metrics(items, s, kept, 0.5)
    result["protocol"] = {"threshold": 0.5, "data": "/data"}
    if with_sweep:
        worse = _metrics(items, np.clip(s + rng.normal(0, 0.2, 40), 0, 1), kept, 0.5)
        result["robustness"] = {"jpeg95": worse}
    return result, y, s, np.array(gens)


def test_univfd_report_matches_validate_py(tmp_path):
    """Catches UnivFD files with other names, another rounding or column order, or accuracies
    counted with ``>=``: ap.txt is ``key: AP%``, acc0.txt ``key: real%  fake%  acc%``."""
    result, y, s, gens = _result()
    write_report(result, tmp_path, "univfd")
    ap_lines, acc_lines = [], []
    for g in ("adm", "sd"):
        yy, ss = y[gens == g], s[gens == g]
        ap_lines.append(f"{g}: {round(average_precision_score(yy, ss) * 100, 2)}")
        r = accuracy_score(yy[yy == 0], ss[yy == 0] > 0.5)
        f = accuracy_score(yy[yy == 1], ss[yy == 1] > 0.5)
        a = accuracy_score(yy, ss > 0.5)
        acc_lines.append(f"{g}: {round(r * 100, 2)}  {round(f * 100, 2)}  {round(a * 100, 2)}")
    assert (tmp_path / "ap.txt").read_text().splitlines() == ap_lines
    assert (tmp_path / "acc0.txt").read_text().splitlines() == acc_lines
    assert (tmp_path / "jpeg95" / "acc0.txt").exists()  # the sweep: one folder per perturbation


def test_sidbench_report_matches_write_metrics(tmp_path):
    """Catches SIDBench tables with other headers, widths or percentages, and metrics.json
    records whose confusion counts or accuracies differ from ``calculate_for_threshold``."""
    result, y, s, gens = _result(with_sweep=False)
    write_report(result, tmp_path, "sidbench")
    lines = (tmp_path / "acc_05.txt").read_text().splitlines()
    assert lines[:3] == ["Generative            TNR          TPR             ",
                         "Model             (Reals)        Fakes     Accuracy", "-" * 48]
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["generative_model"] for r in records] == ["adm", "sd"]
    for g, line, rec in zip(("adm", "sd"), lines[3:], records):
        yy, ss = y[gens == g], s[gens == g]
        r = accuracy_score(yy[yy == 0], ss[yy == 0] > 0.5)
        f = accuracy_score(yy[yy == 1], ss[yy == 1] > 0.5)
        a = accuracy_score(yy, ss > 0.5)
        assert line == f"{g:<12} {r * 100:>12.2f} {f * 100:>12.2f} {a * 100:>12.2f}"
        tn, fp, fn, tp = confusion_matrix(yy, ss > 0.5).ravel()
        t05 = rec["threshold_05"]
        assert (t05["tn"], t05["fp"], t05["fn"], t05["tp"]) == (tn, fp, fn, tp)
        assert (t05["r_acc"], t05["f_acc"], t05["acc"]) == pytest.approx((r, f, a))
        assert rec["ap"] == pytest.approx(average_precision_score(yy, ss))
        assert rec["roc_auc"] == pytest.approx(roc_auc_score(yy, ss))
        t = rec["best_threshold"]
        assert rec["oracle_threshold"]["acc"] == pytest.approx(accuracy_score(yy, ss > t))
        for key, cls in (("r_acc", 0), ("f_acc", 1)):
            assert rec["oracle_threshold"][key] == pytest.approx(
                accuracy_score(yy[yy == cls], ss[yy == cls] > t))
    ap = (tmp_path / "ap.txt").read_text().splitlines()
    assert ap[3] == f"{'adm':<12} {average_precision_score(y[:20], s[:20]) * 100:>12.2f}"
    assert len((tmp_path / "acc_oracle.txt").read_text().splitlines()[0]) == 64


def test_deepfakebench_report_matches_get_test_metrics(tmp_path):
    """Catches DeepfakeBench dicts with other keys or values than ``get_test_metrics`` (acc at
    ``> 0.5``, auc, DeepfakeBench's eer, ap) and an avg that is not their plain mean."""
    result, y, s, gens = _result(with_sweep=False)
    write_report(result, tmp_path, "deepfakebench")
    for g in ("adm", "sd"):
        yy, ss = y[gens == g], s[gens == g]
        fpr, tpr, _ = roc_curve(yy, ss, pos_label=1)
        expected = {"acc": float(((ss > 0.5).astype(int) == yy).sum() / len(yy)),
                    "auc": auc(fpr, tpr), "eer": _deepfakebench_eer(yy, ss),
                    "ap": average_precision_score(yy, ss), "video_auc": auc(fpr, tpr)}
        with open(tmp_path / "test" / g / "metric_dict_best.pickle", "rb") as f:
            got = pickle.load(f)  # our own file, written just above
        assert set(got) == set(expected)
        assert got == pytest.approx(expected)
        assert json.loads((tmp_path / "test" / g / "metric_dict_best.json").read_text()) == \
            pytest.approx(expected)
    avg = json.loads((tmp_path / "test" / "avg" / "metric_dict_best.json").read_text())
    per = [json.loads((tmp_path / "test" / g / "metric_dict_best.json").read_text()) for g in ("adm", "sd")]
    assert avg["eer"] == pytest.approx((per[0]["eer"] + per[1]["eer"]) / 2)
    assert avg["dataset_dict"] == pytest.approx({"adm": per[0]["auc"], "sd": per[1]["auc"]})


def test_reports_stay_inside_their_folder_and_refuse_unknown_formats(tmp_path):
    """Catches a generator named like a path (``../x`` from a manifest) writing outside the
    report folder, NaN written as invalid JSON, and a typo'd format silently writing nothing."""
    items = [LabelledImage("/a.png", 1, "../escape"), LabelledImage("/b.png", 1, "../escape")]
    result = _metrics(items, np.array([0.7, 0.2]), np.arange(2), 0.5)  # one class: auc undefined
    out = tmp_path / "out"
    for fmt in FORMATS:
        write_report(result, out, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    dfb = json.loads(next((out / "test").glob("*escape*/metric_dict_best.json")).read_text())
    assert dfb["auc"] is None and dfb["acc"] == 0.5
    with pytest.raises(ValueError, match="univfd"):
        write_report(result, out, "cnndetect")
