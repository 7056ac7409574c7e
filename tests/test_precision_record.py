"""``auto`` picks bf16 on a CPU only on evidence: the detector's ``precision.json`` (written by
``aigid agreement``) must name these very weights, hold ≥ 200 images and stay within the bounds
(flips ≤ 0.5%, |ΔAUROC| ≤ 0.002); the record holds what the two precisions really scored."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.cli import main
from aigid.evaluation.agreement import agreement, measure
from aigid.models import precision as precision_mod
from aigid.models.identity import model_id
from aigid.models.precision_record import (MIN_IMAGES, RECORD_FILE, bf16_verdict, read_record,
                                           within_bounds, write_record)
from aigid.models.registry import load_detector

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_CPU = ("avx512f", "avx512_bf16")


def _report(n=240, flips=0.0, d_auroc=0.0):
    return {"n": n, "max_abs_dp": 1e-3, "flip_fraction": flips, "auroc_fp32": 0.9, "auroc": 0.9 + d_auroc,
            "d_auroc": d_auroc}


@pytest.mark.parametrize("report, ok", [
    (_report(), True),
    (_report(flips=0.005, d_auroc=-0.002), True),     # the bounds themselves are allowed
    (_report(flips=0.0051), False),
    (_report(d_auroc=0.0021), False),
    (_report(d_auroc=-0.0021), False),
    (_report(n=MIN_IMAGES - 1), False),                # too few to show 0.5%
])
def test_bounds(report, ok):
    assert within_bounds(report) is ok
    assert bf16_verdict({"model_id": "m", "precisions": {"bf16": report}}, "m")[0] is ok


def test_a_record_counts_only_for_the_weights_it_was_measured_on():
    record = {"model_id": "mirage-aaaa", "precisions": {"bf16": _report()}}
    assert bf16_verdict(record, "mirage-aaaa") == (True, "bf16 agrees with fp32 (0.00% flips, dAUROC +0.0000 on 240 images)")
    assert bf16_verdict(record, "mirage-bbbb")[0] is False
    assert "other weights" in bf16_verdict(record, "mirage-bbbb")[1]
    assert bf16_verdict(None, "mirage-aaaa")[0] is False
    assert bf16_verdict({"model_id": "mirage-aaaa", "precisions": {"int8": _report()}}, "mirage-aaaa")[0] is False


def test_an_unreadable_record_is_no_record(tmp_path):
    (tmp_path / RECORD_FILE).write_text("{not json")
    assert read_record(tmp_path) is None
    (tmp_path / RECORD_FILE).write_text(json.dumps({"format": 99, "model_id": "x"}))
    assert read_record(tmp_path) is None
    write_record(tmp_path, {"model_id": "x", "precisions": {"bf16": {"n": 240}}})  # a report missing its numbers
    assert read_record(tmp_path) is None
    good = {"model_id": "x", "precisions": {"bf16": _report()}}
    write_record(tmp_path, good)
    assert read_record(tmp_path) == {**good, "format": 1}


def _labelled_set(root, n_per_class, seed=0):
    rng = np.random.default_rng(seed)
    for label in ("0_real", "1_fake"):
        folder = root / "val" / label
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def detector(tiny_mirage_folder, tmp_path):
    folder = tmp_path / "det"
    shutil.copytree(tiny_mirage_folder, folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _labelled_set(tmp_path_factory.mktemp("data"), MIN_IMAGES // 2 + 5)


def _flags(monkeypatch, flags):
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset(flags))


def test_the_record_holds_what_each_precision_scored(detector, data):
    fp32 = load_detector(str(detector), precision="fp32")
    record = measure(fp32, str(data), split="val", progress=False)
    assert record["model_id"] == model_id(fp32) and record["compared"] == 2 * (MIN_IMAGES // 2 + 5)
    assert fp32.precision == "fp32"  # measured on a copy: the detector given stays fp32
    # the same numbers, computed apart: two detectors loaded from the folder score every image
    from aigid.data.labelled import discover
    items = discover(str(data), "val")
    paths, labels = [it.path for it in items], [it.label for it in items]
    want = agreement(load_detector(str(detector), precision="fp32").predict(paths),
                     load_detector(str(detector), precision="bf16").predict(paths), labels)
    got = record["precisions"]["bf16"]
    assert got["n"] == want["n"] and got["flip_fraction"] == want["flip_fraction"]
    assert got["max_abs_dp"] == pytest.approx(want["max_abs_dp"], abs=1e-6) and got["max_abs_dp"] > 0
    assert got["d_auroc"] == pytest.approx(want["d_auroc"], abs=1e-9)


def test_auto_follows_the_record(detector, monkeypatch):
    _flags(monkeypatch, BF16_CPU)
    assert load_detector(str(detector), precision="auto").precision == "fp32"  # no record yet
    mid = model_id(load_detector(str(detector)))
    write_record(detector, {"model_id": mid, "precisions": {"bf16": _report()}})
    model = load_detector(str(detector), precision="auto")
    assert model.precision == "bf16" and "agrees" in model.precision_why
    assert {p.dtype for p in model.clip.visual.parameters()} == {torch.bfloat16}
    _scan_records_why(model, detector.parent)
    write_record(detector, {"model_id": mid, "precisions": {"bf16": _report(d_auroc=0.003)}})
    model = load_detector(str(detector), precision="auto")
    assert model.precision == "fp32" and "beyond the bounds" in model.precision_why
    _flags(monkeypatch, ("avx2",))  # a CPU without bf16 instructions: the record does not matter
    write_record(detector, {"model_id": mid, "precisions": {"bf16": _report()}})
    assert load_detector(str(detector), precision="auto").precision == "fp32"


def _scan_records_why(model, root):
    from aigid.scanning.local import scan_to_store
    from aigid.scanning.store import ResultStore

    (root / "imgs").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / "imgs" / "a.png")
    scan_to_store([root / "imgs"], model, out=root / "r.sqlite", progress=False, num_workers=0)
    with ResultStore(root / "r.sqlite", readonly=True) as store:
        (run,) = store.runs()
    assert run["detector"]["precision"] == "bf16" and run["detector"]["precision_why"] == model.precision_why


def test_recalibrating_makes_the_record_stale(detector, data, monkeypatch):
    _flags(monkeypatch, BF16_CPU)
    mid = model_id(load_detector(str(detector)))
    write_record(detector, {"model_id": mid, "precisions": {"bf16": _report()}})
    assert main(["calibrate", str(detector), str(data), "--split", "val", "--quiet", "--device", "cpu"]) == 0
    model = load_detector(str(detector), precision="auto")
    assert model_id(model) != mid  # the threshold it was measured at is gone
    assert model.precision == "fp32" and "other weights or calibration" in model.precision_why


def test_aigid_agreement_writes_the_record_and_the_card(detector, data, capsys):
    card_before = (detector / "README.md").read_text()
    assert main(["agreement", str(detector), str(data), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    record = read_record(detector)
    assert record["model_id"] == model_id(load_detector(str(detector)))
    assert out["precisions"]["bf16"]["n"] == record["precisions"]["bf16"]["n"] == record["compared"]
    assert out["auto_cpu_bf16"] is bf16_verdict(record, record["model_id"])[0]
    card = (detector / "README.md").read_text()
    assert "labelled images of" in card and "- bf16: max |dP|" in card and "`auto` on a CPU" in card
    # the rest of the card is kept: only the Precision section changed
    strip = lambda text: text.split("## Precision")[0]  # noqa: E731
    assert strip(card) == strip(card_before) and "## How to use" in card


def test_measuring_int8_later_keeps_the_bf16_measurement(detector, data):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["agreement", str(detector), str(data), "--quiet"]) == 0
    assert main(["agreement", str(detector), str(data), "--precisions", "int8", "--quiet"]) == 0
    assert set(read_record(detector)["precisions"]) == {"bf16", "int8"}


def test_int8_leaves_the_root_logger_unconfigured(tmp_path):
    """ONNX Runtime's quantiser calls logging.warning, which would give the root logger a handler
    (every later notice printed twice); pytest holds root handlers, so this runs in a fresh process."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    code = ("import logging; from aigid.models.mirage import MiraGe, MiraGeConfig; "
            "from aigid.models.precision import set_precision; "
            "set_precision(MiraGe(MiraGeConfig.named('tiny'), seed=0).eval(), 'int8'); "
            "print(len(logging.root.handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0"


@pytest.mark.parametrize("extra, says", [
    (["--device", "cuda"], "measured on a CPU"),
    (["--precisions", "fp16"], "--precisions fp16"),
])
def test_cli_mistakes_are_one_line(detector, data, capsys, extra, says):
    assert main(["agreement", str(detector), str(data), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_unigendet_has_bf16_but_no_int8(tmp_path, capsys):
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig

    folder = tmp_path / "ug"
    UniGenDet(UniGenDetConfig.named("tiny"), seed=0).save_pretrained(folder)
    small = _labelled_set(tmp_path / "small", 3)
    assert main(["agreement", str(folder), str(small), "--quiet"]) == 0
    report = read_record(folder)["precisions"]["bf16"]
    assert report["n"] == 6 and 0 < report["max_abs_dp"] < 0.01
    capsys.readouterr()
    assert main(["agreement", str(folder), str(small), "--precisions", "int8", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert str(folder) in err and "UniGenDet cannot be exported" in err and len(err.splitlines()) == 1
