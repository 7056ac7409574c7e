"""UniGenDet sees images as the public code does: BAGEL's aspect-keeping resize, per-image token
grids, mixed sizes packed in one sequence, a seeded VAE posterior, and the two verdict modes."""
from __future__ import annotations

import math
import sqlite3

import pytest
import torch
from PIL import Image

from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.models.unigendet import config as config_mod


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def tiny():
    return UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()


def test_shipped_7b_config_uses_bagels_two_resizes():
    c = UniGenDetConfig.named("bagel-7b")
    pp = c.preprocess
    assert (pp["resize_mode"], pp["max_size"], pp["size"], pp["stride"]) == ("bagel", 1024, 512, 16)
    assert c.vit_resize == {"max_size": 980, "min_size": 224, "stride": 14}
    assert c.question == "Does the image looks real/fake?" and c.latent_sample and c.verdict == "head"


@pytest.mark.parametrize("size,latent_grid,vit_grid", [
    ((512, 512), (32, 32), (37, 37)),
    ((1024, 768), (48, 64), (52, 70)),
    ((1920, 1080), (36, 64), (39, 70)),
])
def test_token_grids_follow_bagels_rule(size, latent_grid, vit_grid):
    # BAGEL's sizes with a narrow model: SigLIP at patch 14 with a 70-wide position table.
    c = UniGenDetConfig.named("tiny")
    c.preprocess = dict(UniGenDetConfig.named("bagel-7b").preprocess)
    c.vit_resize = dict(UniGenDetConfig.named("bagel-7b").vit_resize)
    c.vit = {**c.vit, "image_size": 980, "patch_size": 14}
    c.max_latent_size = 64
    model = UniGenDet(c).eval()
    (vae_px,) = model.preprocess(_image(*size))
    assert (vae_px.shape[-2] // 16, vae_px.shape[-1] // 16) == latent_grid
    vit_px = model.vit_image(vae_px)
    assert (vit_px.shape[-2] // 14, vit_px.shape[-1] // 14) == vit_grid
    lat = torch.zeros(1, 4, vae_px.shape[-2] // 8, vae_px.shape[-1] // 8)
    out = model(det=model.detection_inputs([vae_px], latents=lat))
    assert out.vit_grid == vit_grid and out.vit_index.shape == (1, vit_grid[0] * vit_grid[1])


def test_mixed_sizes_in_one_batch_score_as_one_at_a_time(tiny):
    images = [_image(48, 40, 0), _image(32, 64, 1), _image(64, 64, 2), _image(48, 40, 3)]
    sizes = {tuple(p.shape) for p in tiny.preprocess(images)}
    assert len(sizes) == 3  # really mixed: three different VAE image sizes
    together = tiny.predict(images)
    alone = torch.cat([tiny.predict(im) for im in images])
    assert torch.allclose(together, alone, atol=1e-5)
    out = tiny(det=tiny.detection_inputs(tiny.preprocess(images)))
    assert isinstance(out.vit_grid, list) and len(out.vit_index) == 4
    assert [len(ix) for ix in out.vit_index] == [g[0] * g[1] for g in out.vit_grid]


def test_vae_posterior_is_sampled_per_image_with_a_seed(tiny):
    px = tiny.preprocess([_image(48, 40, 0), _image(48, 40, 1)])
    a, b = tiny.encode_latents(px), tiny.encode_latents(px)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    mode = tiny.encode_latents(px, sample=False)
    other = tiny.encode_latents(px, seed=1)
    assert not torch.allclose(a[0], mode[0]) and not torch.allclose(a[0], other[0])
    per_image = tiny.encode_latents(px, seed=[0, 5])  # one seed per image (training draws them)
    assert torch.equal(per_image[0], a[0]) and not torch.allclose(per_image[1], a[1])
    with pytest.raises(ValueError, match="seeds"):
        tiny.encode_latents(px, seed=[0])
    alone = tiny.encode_latents(px[1:])  # an image's noise does not depend on its batch
    assert torch.allclose(alone[0], a[1], atol=1e-5)


def test_text_verdict_parses_the_greedy_answer_to_the_evaluation_prompt(tiny, monkeypatch):
    seen = {}

    def fake_explain(images, **kw):
        seen.update(kw)
        return ["This is a fake image. The shadows ...", "this is a real image.", "I cannot tell"]

    monkeypatch.setattr(tiny, "explain", fake_explain)
    p = tiny.predict([_image(32, 32, i) for i in range(3)], verdict="text")
    assert p[0] == 1.0 and p[1] == 0.0 and math.isnan(p[2])
    assert seen["greedy"] is True
    assert seen["question"] == tiny.config.question + config_mod.FAKEVLM_EVAL_HINT
    with pytest.raises(ValueError, match="verdict"):
        tiny.predict([_image(32, 32)], verdict="logits")


def test_scan_and_eval_record_an_unparsed_answer_as_an_error(tiny, tmp_path, monkeypatch):
    from aigid.evaluation.runner import evaluate
    from aigid.scanning.local import NO_VERDICT, scan_to_store
    for cls in ("real", "fake"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            _image(40 + 8 * i, 40, i).save(tmp_path / "data" / cls / f"{i}.png")
    answers = iter(["this is a fake image", "no idea"] * 8)
    monkeypatch.setattr(tiny, "explain", lambda images, **kw: [next(answers) for _ in images])
    tiny.config.verdict = "text"
    try:
        db = tmp_path / "r.sqlite"
        scan_to_store([str(tmp_path / "data")], tiny, out=str(db), num_workers=0, progress=False,
                      batch_size=4)
        with sqlite3.connect(db) as conn:
            got = conn.execute("SELECT score, error FROM results ORDER BY id").fetchall()
        assert sorted(got, key=str) == sorted([(1.0, None), (None, NO_VERDICT)] * 2, key=str)
        report = evaluate(tiny, str(tmp_path / "data"), progress=False, batch_size=4)
        assert report["protocol"]["verdict"] == "text" and report["protocol"]["n_scored"] == 2
        assert sum(e["error"] == NO_VERDICT for e in report["errors"]) == 2
    finally:
        tiny.config.verdict = "head"


def test_generation_presets(tiny, monkeypatch):
    from aigid.models.unigendet import flow
    seen = {}

    def fake_sample(velocity, noise, **kw):
        seen.update(kw, n_tokens=noise.shape[1])
        return noise

    monkeypatch.setattr(flow, "euler_sample", fake_sample)
    out = tiny.generate(["a cat"], decode=False)
    assert seen["cfg_interval"] == (0.4, 1.0) and seen["steps"] == 50 and out.latents.shape[-1] == 4
    out = tiny.generate(["a cat"], decode=False, preset="paper-fid")
    assert seen["cfg_interval"] == (0.0, 1.0) and out.latents.shape[-2:] == (128, 128)
    with pytest.raises(ValueError, match="preset"):
        tiny.generate(["a cat"], preset="fid")


def test_vit_image_is_the_public_codes_pil_resize_of_the_vae_image():
    # The public pipeline: PIL resize to the VAE size, then PIL resize of *that* image for SigLIP.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    from aigid.data.bagel_resize import bagel_size
    c = UniGenDetConfig.named("tiny")
    c.preprocess = dict(UniGenDetConfig.named("bagel-7b").preprocess)
    c.vit_resize = dict(UniGenDetConfig.named("bagel-7b").vit_resize)
    model = UniGenDet(c)
    pil = _image(700, 530, 4)
    vw, vh = bagel_size(700, 530, 1024, 512, 16)
    vae_pil = TF.resize(pil, [vh, vw], InterpolationMode.BICUBIC, antialias=True)
    tw, th = bagel_size(vw, vh, 980, 224, 14)
    vit_pil = TF.resize(vae_pil, [th, tw], InterpolationMode.BICUBIC, antialias=True)
    want = (TF.pil_to_tensor(vit_pil).float() / 255 - 0.5) / 0.5
    (vae_px,) = model.preprocess(pil)
    assert torch.allclose(vae_px, (TF.pil_to_tensor(vae_pil).float() / 255 - 0.5) / 0.5, atol=1e-6)
    got = model.vit_image(vae_px)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
