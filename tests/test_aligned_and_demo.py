"""Aligned fakes through a (tiny, locally saved) VAE, and the offline demo end to end."""
import json
import os

import numpy as np
import torch
from PIL import Image

from aigid.cli import main
from aigid.data.aligned import fit_tiny_vae, load_vae, reconstruct


def test_fit_tiny_vae_reduces_reconstruction_error():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    untrained = fit_tiny_vae(x, steps=0)
    trained = fit_tiny_vae(x, steps=60, batch_size=8)
    err = lambda vae: torch.mean((reconstruct(vae, x) - x) ** 2).item()  # noqa: E731
    assert err(trained) < 0.75 * err(untrained)


def test_make_aligned_cli_with_a_local_vae(tmp_path):
    vae_dir = tmp_path / "vae"
    fit_tiny_vae(torch.rand(4, 3, 16, 16) * 2 - 1, steps=2).save_pretrained(vae_dir)
    assert load_vae(str(vae_dir)).config.latent_channels == 4
    reals = tmp_path / "reals"
    os.makedirs(reals / "sub")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(reals / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(reals / "sub" / "b.png")
    (reals / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "fakes"
    assert main(["make-aligned", str(reals), str(out), "--vae", str(vae_dir), "--quiet"]) == 0
    assert Image.open(out / "a.png").size == (30, 20)  # same size as its real twin (odd sides padded)
    assert Image.open(out / "sub" / "b.png").size == (16, 16)
    errors = [json.loads(l) for l in open(out / "errors.jsonl")]
    assert [os.path.basename(e["path"]) for e in errors] == ["broken.jpg"]


def test_load_vae_missing_folder(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError):
        load_vae(str(tmp_path / "nothing"))


def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--vae-steps", "3", "--per-photo", "4",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "held-out" in text and "toy detector" in text and "aigid train DATA --pretrained" in text
    assert sorted(os.listdir(out / "data" / "train")) == ["fake", "real"]
    assert (out / "detector" / "model.safetensors").exists()
    summary = json.loads((out / "detector" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["val"]["overall"]["n"] == 24  # 3 held-out photos x 4 crops x 2


def test_demo_report_reads_the_numbers_honestly():
    from aigid.demo import chance_band, demo_report

    band = chance_band(120, 120)
    assert 0.07 < band < 0.08  # 2 sd of a signal-free AUROC with 120 + 120 crops
    m = {"n": 240, "n_real": 120, "n_fake": 120, "acc": 0.4, "real_acc": 0.5, "fake_acc": 0.3, "ap": 0.4}
    below = demo_report({"val": {"overall": {**m, "auroc": 0.365}}, "steps": 4}, "o")
    assert "below chance" in below and "near chance" not in below
    assert "within chance" in demo_report({"val": {"overall": {**m, "auroc": 0.52}}, "steps": 4}, "o")
    assert "above chance" in demo_report({"val": {"overall": {**m, "auroc": 0.7}}, "steps": 4}, "o")
