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
    from aigid import demo

    summary = demo.run_demo(str(tmp_path), steps=4, per_photo=4, vae_steps=3, progress=False)
    text = capsys.readouterr().out
    assert "held-out" in text and "toy detector" in text
    assert summary["val"]["overall"]["n"] == 24  # 3 held-out photos x 4 crops x 2 classes
    assert sorted(os.listdir(tmp_path / "data" / "train")) == ["fake", "real"]
    assert (tmp_path / "detector" / "model.safetensors").exists()
