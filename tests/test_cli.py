"""`aigid train` and `aigid eval` on a folder, from the command line, as a user runs them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from aigid.cli import main


def _folder(root, n=12, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for label in ("real", "fake"):
            os.makedirs(root / split / label)
            for i in range(n):
                img = rng.integers(0, 255, (8, 8, 3)).repeat(4, 0).repeat(4, 1)
                if label == "fake":
                    img[::4, :] = 255  # a visible grid artefact
                Image.fromarray(img.astype(np.uint8)).save(root / split / label / f"{i}.png")
    (root / "train" / "fake" / "corrupt.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = _folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("run") / "det"
    proc = subprocess.run(
        [sys.executable, "-m", "aigid.cli", "train", str(root), "--model", "tiny", "--out", str(out),
         "--max-steps", "6", "--batch-size", "8", "--lr", "0.01"],
        capture_output=True, text=True, env={**os.environ, "AIGID_QUIET": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root, out, proc


def test_train_writes_detector_summary_and_shows_progress(trained):
    root, out, proc = trained
    assert {"config.json", "model.safetensors", "train_log.jsonl", "train_summary.json"} <= set(os.listdir(out))
    assert "train:" in proc.stderr and "step" in proc.stderr  # the tqdm progress bar
    assert "aigid: supcon=" in proc.stderr  # the backend choice is announced
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_split"] == "train"
    assert summary["train_data"]["total"] == 25  # 24 images + the corrupt file, listed
    assert [os.path.basename(e["path"]) for e in summary["skipped_files"]] == ["corrupt.png"]
    assert summary["val"]["overall"]["n"] == 24  # val split picked up automatically
    assert len(open(out / "train_log.jsonl").readlines()) == 6


def test_eval_writes_metrics_json(trained, tmp_path):
    root, out, _ = trained
    result_path = tmp_path / "metrics.json"
    assert main(["eval", str(root), "--detector", str(out), "--split", "val", "--out", str(result_path),
                 "--quiet"]) == 0
    result = json.loads(result_path.read_text())
    overall = result["overall"]
    assert overall["n"] == 24 and overall["n_real"] == 12 and overall["n_fake"] == 12
    for key in ("acc", "real_acc", "fake_acc", "ap", "auroc", "eer"):
        assert 0.0 <= overall[key] <= 1.0
    assert result["protocol"]["preprocess"]["size"] == 32 and result["errors"] == []


def test_eval_per_generator(tmp_path, trained):
    _, out, _ = trained
    for gen in ("sd", "adm"):
        _folder(tmp_path / gen, n=3, seed=len(gen))
    result_path = tmp_path / "r.json"
    main(["eval", str(tmp_path), "--detector", str(out), "--split", "val", "--out", str(result_path), "--quiet"])
    result = json.loads(result_path.read_text())
    assert sorted(result["per_generator"]) == ["adm", "sd"]
    assert all(m["n"] == 6 for m in result["per_generator"].values())
    assert result["mean_over_generators"]["acc"] == pytest.approx(
        np.mean([m["acc"] for m in result["per_generator"].values()]))


def test_train_refuses_a_single_class(tmp_path, capsys):
    os.makedirs(tmp_path / "real")
    Image.new("RGB", (8, 8)).save(tmp_path / "real" / "a.png")
    assert main(["train", str(tmp_path), "--model", "tiny", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "both real and fake" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")  # refused before any work


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"cuda", "triton", "flash_attn", "dali"}


def test_eval_robustness_sweep_and_oracle(trained, tmp_path):
    root, out, _ = trained
    result_path = tmp_path / "metrics.json"
    assert main(["eval", str(root), "--detector", str(out), "--split", "val", "--out", str(result_path),
                 "--robustness", "jpeg30,blur4", "--quiet"]) == 0
    result = json.loads(result_path.read_text())
    assert set(result["robustness"]) == {"jpeg30", "blur4"}
    assert result["protocol"]["robustness"] == ["jpeg30", "blur4"]
    assert 0.5 <= result["overall"]["oracle_acc"] <= 1 and result["overall"]["oracle_acc"] >= result["overall"]["acc"]
    for name, metrics in result["robustness"].items():
        assert metrics["overall"]["n"] == 24
    # blur4 erases the 1-pixel grid the tiny detector keys on: its scores must actually change
    assert result["robustness"]["blur4"]["overall"] != result["overall"]


def test_eval_rejects_unknown_perturbation(trained, capsys):
    root, out, _ = trained
    assert main(["eval", str(root), "--detector", str(out), "--robustness", "jpeg90,sharpen", "--quiet"]) == 2
    assert "unknown perturbation 'sharpen'" in capsys.readouterr().err


def test_export_model_command_matches_predict(trained, tmp_path):
    """Catches the CLI's export-model wiring dropping the detector or the format (a file that loads
    but scores something else, or an ONNX written when torch-export was asked)."""
    import torch

    import aigid
    _, det, _ = trained
    out = tmp_path / "m.pt2"
    assert main(["export-model", str(det), str(out), "--format", "torch-export", "--quiet"]) == 0
    detector = aigid.load_detector(str(det))
    pixels = torch.randn(2, 3, 32, 32)
    program = torch.export.load(str(out)).module()
    assert torch.allclose(program(pixels).reshape(-1), detector.predict(pixels), atol=1e-6)


def test_eval_writes_a_framework_report(trained, tmp_path, capsys):
    """Catches --format being accepted but never written (or written without --report's folder)."""
    root, det, _ = trained
    report = tmp_path / "univfd"
    assert main(["eval", str(root), "--detector", str(det), "--split", "val", "--format", "univfd",
                 "--report", str(report), "--quiet"]) == 0
    assert {"ap.txt", "acc0.txt"} <= set(os.listdir(report))
    capsys.readouterr()
    assert main(["eval", str(root), "--detector", str(det), "--format", "univfd", "--quiet"]) == 2
    assert "--report" in capsys.readouterr().err


def test_scan_sniff_flag_reads_images_by_content(trained, tmp_path, capsys):
    """Catches --sniff not reaching the scanner: a PNG named .dat is skipped without it, scored with it."""
    root, det, _ = trained
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "x.dat").write_bytes((root / "val" / "real" / "0.png").read_bytes())
    args = ["scan", str(folder), "--detector", str(det), "--workers", "0", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.sqlite")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["scored"] == 0 and plain["skipped_not_image"] == {".dat": 1}
    assert main(args + ["--out", str(tmp_path / "b.sqlite"), "--sniff"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 1


def test_calibrate_command_stores_calibration_and_threshold(trained, tmp_path, capsys):
    """Catches `aigid calibrate` fitting but never storing (config.json unchanged), or storing a
    threshold that eval then ignores."""
    import shutil
    root, det, _ = trained
    mine = tmp_path / "det"
    shutil.copytree(det, mine)
    assert main(["calibrate", str(mine), str(root), "--split", "val", "--balanced", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    with open(mine / "config.json") as f:
        stored = json.load(f)["calibration"]
    assert stored["rule"] == "balanced" and stored["threshold"] == pytest.approx(report["threshold"], abs=1e-5)
    assert main(["eval", str(root), "--detector", str(mine), "--split", "val", "--quiet"]) == 0
    overall = json.loads(capsys.readouterr().out)["overall"]
    assert overall["stored_threshold"] == pytest.approx(report["threshold"], abs=1e-4)
    assert "ece" in overall and "brier" in overall


def test_calibrate_in_place_refreshes_the_card_and_keeps_its_training_summary(trained, tmp_path,
                                                                              capsys):
    """Catches `aigid calibrate` (no --out) leaving a card that still says the scores are not
    calibrated, a refresh that drops the training summary only the old card held, and a second
    calibration stacking a second Calibration section."""
    import shutil
    root, det, _ = trained
    mine = tmp_path / "det"
    shutil.copytree(det, mine)
    before = (mine / "README.md").read_text()
    training = before.split("## Training data")[1].split("## ")[0]
    assert "not recorded" not in training and "not calibrated" in before
    for _ in range(2):
        assert main(["calibrate", str(mine), str(root), "--split", "val", "--quiet"]) == 0
        capsys.readouterr()
    after = (mine / "README.md").read_text()
    assert after.count("## Calibration") == 1 and "not calibrated" not in after
    assert "Scores are calibrated on the data named under Calibration" in after
    assert training in after
    assert after.index("## Calibration") < after.index("## How to use")
