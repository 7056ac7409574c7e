"""MiraGe end to end on tiny data: it learns a separable set, not shuffled labels; checkpoints."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aigid.models.mirage import MiraGe


def _separable(n, seed):
    """Smooth random images; fakes carry a faint 4-px grid (an upsampling-like artefact)."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    y = torch.arange(n) % 2
    idx = torch.arange(32)
    grid = ((idx[None, :] % 4 == 0) | (idx[:, None] % 4 == 0)).float()
    return (low + 0.15 * y[:, None, None, None] * grid - 0.45) / 0.27, y


def _fit(model, x, y, steps=300, lr=0.01, seed=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = model.training_loss(x[idx], y[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data():
    return _separable(256, 1), _separable(128, 2)


def _accuracy(model, x, y):
    return ((model.predict(x) > 0.5).long() == y).float().mean().item()


def test_learns_a_separable_set(tiny_config, data):
    (xtr, ytr), (xte, yte) = data
    model = _fit(MiraGe(tiny_config), xtr, ytr)
    assert _accuracy(model, xte, yte) >= 0.9
    assert model.bank.filled == 64  # the FIFO bank was used and is full


def test_shuffled_labels_stay_near_chance(tiny_config, data):
    (xtr, ytr), (xte, yte) = data
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(3))]
    model = _fit(MiraGe(tiny_config), xtr, shuffled)
    assert 0.3 <= _accuracy(model, xte, yte) <= 0.7


def test_only_prompts_change_during_training(tiny_config, data):
    (xtr, ytr), _ = data
    model = MiraGe(tiny_config)
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    prompts = model.prompts.text.detach().clone()
    _fit(model, xtr, ytr, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.clip.state_dict().items())
    assert not torch.equal(prompts, model.prompts.text)


def test_save_load_round_trip_gives_identical_logits(tiny_config, data, tmp_path):
    (xtr, ytr), (xte, _) = data
    model = _fit(MiraGe(tiny_config), xtr, ytr, steps=5)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "backbone.safetensors", "config.json", "model.safetensors"]
    loaded = MiraGe.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xte)["logits"], model(xte)["logits"], rtol=0, atol=0)


def test_named_backbone_checkpoint_saves_only_prompts(tiny_config, tmp_path):
    """A backbone with its own weights file is referenced, not copied, by the detector."""
    model = MiraGe(tiny_config)
    ckpt = tmp_path / "clip.pt"
    torch.save(model.clip.state_dict(), ckpt)
    tiny_config.backbone = {**tiny_config.backbone, "pretrained": str(ckpt)}
    with torch.no_grad():
        model.prompts.text += 1.0
    referenced = MiraGe(tiny_config)
    referenced.load_state_dict(model.trainable_state_dict(), strict=False)
    referenced.save_pretrained(tmp_path / "det")
    assert sorted(os.listdir(tmp_path / "det")) == ["README.md", "config.json", "model.safetensors"]
    again = MiraGe.from_pretrained(tmp_path / "det")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["logits"], model(x)["logits"], rtol=0, atol=0)


def test_predict_applies_the_detectors_preprocessing(tiny_config, tmp_path):
    model = MiraGe(tiny_config).eval()
    rgb = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    from_path = model.predict(str(path))
    from_pil = model.predict([Image.fromarray(rgb)])
    from_tensor = model.predict(model.preprocess(Image.fromarray(rgb)))
    assert from_path.shape == (1,) and 0 <= from_path.item() <= 1
    torch.testing.assert_close(from_path, from_pil)
    torch.testing.assert_close(from_path, from_tensor)


def test_checkpoint_mismatch_is_refused(tiny_config, tmp_path):
    MiraGe(tiny_config).save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["prompt_depth"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        MiraGe.from_pretrained(tmp_path)


def test_inference_anchor_cache_follows_prompt_updates(tiny_config):
    from aigid.models.mirage import MiraGe

    model = MiraGe(tiny_config, seed=0).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels)["logits"]
        assert torch.equal(model(pixels)["logits"], before)  # served from the cache
        model.prompts.text.add_(0.5)  # an in-place update, as an optimiser step does
        after = model(pixels)["logits"]
    assert not torch.allclose(after, before)
    assert torch.allclose(after, model(pixels)["logits"].detach())  # grad-enabled path agrees
