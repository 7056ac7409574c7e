"""Loading released UniGenDet weights the way the public code does: a BAGEL base folder, the
fine-tuned checkpoint merged over it, and a clear error where the weights cannot score."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from aigid.errors import MissingHeadError
from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.models.unigendet.release import weight_file

HEADS = ("fake_cls_head.", "diga_mlp.", "latent_to_vit_connector.")


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model: UniGenDet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _base_folder(tmp_path, seed=3, name="ema.safetensors"):
    """A BAGEL-style base: every key but UniGenDet's heads (a plain BAGEL release has none)."""
    src = UniGenDet(UniGenDetConfig.named("tiny"), seed=seed).eval()
    folder = tmp_path / "base"
    folder.mkdir(exist_ok=True)
    save_file({k: v for k, v in _state(src).items() if not k.startswith(HEADS)}, str(folder / name))
    return src, folder


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 4, 4, generator=g)


def _load(folder, **kw):
    return UniGenDet.from_pretrained(folder, config=UniGenDetConfig.named("tiny"), **kw).eval()


def test_a_headless_base_refuses_to_score_unless_random_heads_are_allowed(tmp_path):
    _, folder = _base_folder(tmp_path)
    px, lat = _inputs()
    plain = _load(folder)
    assert set(plain.random_heads) == {"fake_cls_head", "diga_mlp", "latent_to_vit_connector"}
    with pytest.raises(MissingHeadError, match="checkpoint"):
        plain.predict(px, latents=lat)
    with pytest.raises(MissingHeadError):
        plain.detect_logits(px, latents=lat)
    trainable = _load(folder, allow_random_heads=True)
    p = trainable.predict(px, latents=lat)
    assert p.shape == (2,) and torch.isfinite(p).all()


def test_scan_of_a_headless_base_fails_before_reading_anything(tmp_path):
    from aigid.scanning.local import scan_to_store
    _, folder = _base_folder(tmp_path)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(MissingHeadError):
        scan_to_store([str(tmp_path / "imgs")], _load(folder), out=str(tmp_path / "r.sqlite"),
                      num_workers=0, progress=False)


def test_checkpoint_merges_over_the_base_and_the_log_names_both_files(tmp_path, caplog):
    base_src, folder = _base_folder(tmp_path, seed=3)
    tuned = UniGenDet(UniGenDetConfig.named("tiny"), seed=7).eval()
    tuned_state = _state(tuned)
    # the fine-tuned file holds the heads and one layer's understanding expert, nothing else
    ckpt = {k: v for k, v in tuned_state.items()
            if k.startswith(HEADS) or k.startswith("language_model.model.layers.0.mlp.")}
    save_file(ckpt, str(tmp_path / "finetuned.safetensors"))
    with caplog.at_level(logging.INFO, logger="aigid.models.unigendet.release"):
        model = _load(folder, checkpoint=tmp_path / "finetuned.safetensors")
    assert model.random_heads == []
    got, base = _state(model), _state(base_src)
    for k, v in got.items():
        want = ckpt[k] if k in ckpt else base[k]
        assert torch.equal(v, want), k
    log = caplog.text
    assert "ema.safetensors" in log and "finetuned.safetensors" in log
    assert f"{len(ckpt)} tensors from" in log and f"{len(base) - len([k for k in base if k.startswith(HEADS)])} tensors from" in log
    px, lat = _inputs()
    assert torch.isfinite(model.predict(px, latents=lat)).all()  # the head came with the checkpoint


def test_competing_weight_files_are_an_error_unless_one_is_named(tmp_path):
    _, folder = _base_folder(tmp_path, seed=3)
    other = UniGenDet(UniGenDetConfig.named("tiny"), seed=9)
    save_file(_state(other), str(folder / "unigendet_finetuned.safetensors"))
    save_file({"x": torch.zeros(1)}, str(folder / "ae.safetensors"))  # the VAE never competes
    with pytest.raises(ValueError, match="ema.safetensors.*unigendet_finetuned.safetensors"):
        _load(folder)
    assert weight_file(folder, "ema.safetensors").name == "ema.safetensors"
    chosen = _load(folder, weights="unigendet_finetuned.safetensors")
    assert torch.equal(chosen.fake_cls_head[1].weight, other.fake_cls_head[1].weight)
    assert chosen.random_heads == []


def test_a_release_folder_takes_its_ae_safetensors_as_the_vae(tmp_path):
    from aigid.models.unigendet.release import release_config
    _, folder = _base_folder(tmp_path)
    assert release_config(str(folder)).vae.get("path") is None
    save_file({"x": torch.zeros(1)}, str(folder / "ae.safetensors"))
    assert release_config(str(folder)).vae["path"] == str(folder / "ae.safetensors")


def test_our_saved_folder_also_takes_a_checkpoint(tmp_path):
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=1)
    model.save_pretrained(tmp_path / "ours")
    tuned = UniGenDet(UniGenDetConfig.named("tiny"), seed=2)
    head = {k: v for k, v in _state(tuned).items() if k.startswith("fake_cls_head.")}
    save_file(head, str(tmp_path / "head.safetensors"))
    again = UniGenDet.from_pretrained(tmp_path / "ours", checkpoint=tmp_path / "head.safetensors")
    assert torch.equal(again.fake_cls_head[1].weight, tuned.fake_cls_head[1].weight)
    assert torch.equal(again.connector.fc1.weight, model.connector.fc1.weight)


def test_cli_scan_of_a_headless_base_is_one_line_and_checkpoint_fixes_it(tmp_path, capsys):
    from aigid.cli import main
    src, folder = _base_folder(tmp_path)
    save_file({k: v for k, v in _state(src).items() if k.startswith(HEADS)}, str(tmp_path / "heads.safetensors"))
    # a base folder without llm_config.json is read with the bagel-7b sizes: give it the tiny config
    src.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    save_file({k: v for k, v in _state(src).items() if not k.startswith(HEADS)},
              str(tmp_path / "saved" / "model.safetensors"))
    (tmp_path / "imgs").mkdir()
    from PIL import Image
    Image.new("RGB", (40, 32), (10, 200, 30)).save(tmp_path / "imgs" / "a.png")
    args = ["scan", str(tmp_path / "imgs"), "--detector", str(tmp_path / "saved"), "--out",
            str(tmp_path / "r.sqlite"), "--workers", "0", "--quiet", "--device", "cpu"]
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # the load's warning, then the error
    err = lines[-1]
    assert err.startswith("aigid scan:") and "fake_cls_head" in err and "--checkpoint" in err
    assert not any(line.startswith("aigid scan:") for line in lines[:-1])
    assert not any("Traceback" in line for line in lines)
    assert main(args + ["--checkpoint", str(tmp_path / "heads.safetensors")]) == 0
