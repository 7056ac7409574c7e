"""MiraGe's recipe against MaPLe: v_0 before ln_pre, θ_0 from words, lr warmup, crop-only input."""
import json
import math
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from aigid.data.transforms import eval_transform, is_variable_size, train_transform
from aigid.models.mirage import MiraGe
from aigid.training.mirage import TrainConfig, build_model, scheduled_lr, train


def _first_block_input(blocks):
    seen = []
    hook = blocks[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.append(args[0].detach().clone()), with_kwargs=True)
    return seen, hook


def _scramble_ln_pre(model, seed=1):
    """Non-trivial ln_pre gain and bias, so only the real ln_pre (not a bare normalisation) fits."""
    g = torch.Generator().manual_seed(seed)
    ln = model.clip.visual.ln_pre
    with torch.no_grad():
        ln.weight.copy_(1 + torch.randn(ln.weight.shape, generator=g))
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=g))


# ---- layer-0 vision prompt -------------------------------------------------------------------
def test_layer0_vision_prompt_slot_holds_ln_pre_of_mapped_prompt(tiny_config):
    m = MiraGe(tiny_config)
    _scramble_ln_pre(m)
    x = torch.randn(2, 3, 32, 32)
    seen, hook = _first_block_input(m.clip.visual.transformer.resblocks)
    with torch.no_grad():
        m.embed_images(x)
        v0 = m.prompts.to_vision[0](m.prompts.text[0])  # F_0(θ_0)
        expected = m.clip.visual.ln_pre(v0)
        patches = m.clip.visual._embeds(x)  # open_clip's own cls + patches after ln_pre
    hook.remove()
    torch.testing.assert_close(seen[0][:, -2:], expected.expand(2, -1, -1))
    assert not torch.allclose(seen[0][:, -2:], v0.expand(2, -1, -1), atol=1e-3)
    torch.testing.assert_close(seen[0][:, :-2], patches)


def _maple_vision_reference(visual, images, vprompts):
    """MaPLe's VisionTransformer_MaPLe.forward order, written out: embed, + pos, append v_0,
    ln_pre over all tokens, then deeper v_i replace the last B tokens; pool on the class token."""
    b = vprompts.shape[1]
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = torch.cat([x, vprompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(vprompts):
            x = torch.cat([x[:, :-b], vprompts[i].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_vision_tower_matches_maples_order(tiny_config):
    m = MiraGe(tiny_config)
    _scramble_ln_pre(m)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        vprompts = m.prompts.vision()
        ours = m.vision_encoder(x, vprompts)
        ref = _maple_vision_reference(m.clip.visual, x, vprompts)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ---- θ_0 initialisation ----------------------------------------------------------------------
def _tokenizer():
    return open_clip.tokenizer.SimpleTokenizer(context_length=16)  # the tiny config's


def test_prompt_init_from_words_is_their_token_embeddings(tiny_config):
    random_init = MiraGe(tiny_config, seed=0)
    tiny_config.prompt_init = "a photo of a"
    words = MiraGe(tiny_config, seed=0)
    ids = _tokenizer()(["a photo of a"])[0]
    with torch.no_grad():
        expected = words.clip.token_embedding(ids[1:3])  # "a", "photo": the first B=2 after SOS
    torch.testing.assert_close(words.prompts.text[0].detach(), expected, rtol=0, atol=0)
    assert not torch.allclose(random_init.prompts.text[0], expected, atol=1e-3)
    # MaPLe initialises only the first layer from words: deeper θ_i and every F_i stay random
    torch.testing.assert_close(words.prompts.text[1:], random_init.prompts.text[1:], rtol=0, atol=0)
    for f, g in zip(words.prompts.to_vision, random_init.prompts.to_vision):
        torch.testing.assert_close(f.weight, g.weight, rtol=0, atol=0)
    # the class prompts read "a photo of a Real." / "a photo of a Fake."
    torch.testing.assert_close(words.text_encoder.token_ids,
                               _tokenizer()(["a photo of a Real.", "a photo of a Fake."]))


def test_word_init_text_input_is_plain_clips_at_start(tiny_config):
    """At init the learned slots hold exactly the words they replace: layer 0 sees CLIP's own
    embedding of "a photo of a Real." (an off-by-one slot would show here)."""
    tiny_config.prompt_init = "a photo of a"
    m = MiraGe(tiny_config)
    seen, hook = _first_block_input(m.clip.transformer.resblocks)
    with torch.no_grad():
        m.anchors()
        ids = _tokenizer()(["a photo of a Real.", "a photo of a Fake."])
        plain = m.clip.token_embedding(ids) + m.clip.positional_embedding
    hook.remove()
    torch.testing.assert_close(seen[0], plain)


def test_overriding_a_field_marks_its_source():
    m = build_model(TrainConfig(data="unused", model="tiny", overrides={"prompt_init": "a photo of a"}))
    assert m.config.prompt_init == "a photo of a"
    assert m.config.sources["prompt_init"] == "user override"
    assert m.config.sources["bank_size"].startswith("paper")


def test_prompt_init_needs_enough_words(tiny_config):
    tiny_config.prompt_init = "photo"  # one token for B=2
    with pytest.raises(ValueError, match="prompt_tokens"):
        MiraGe(tiny_config)


# ---- learning-rate warmup --------------------------------------------------------------------
def test_scheduled_lr_warmup_then_cosine():
    lrs = [scheduled_lr(s, 6, 2, 0.01, 1e-5) for s in range(6)]
    assert lrs[:2] == [1e-5, 1e-5]
    cos = [0.5 * 0.01 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs[2:] == pytest.approx(cos)
    # no warmup: the schedule this loop always had, lr·½(1+cos(π s/T))
    assert [scheduled_lr(s, 6, 0, 0.01, 1e-5) for s in range(6)] == pytest.approx(
        [0.5 * 0.01 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])


def _folder(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    for label in ("real", "fake"):
        os.makedirs(root / label)
        for i in range(n):
            img = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


def test_train_warmup_epoch_runs_at_warmup_lr_then_schedule(tmp_path):
    data = _folder(tmp_path / "data")  # 8 images, batch 4 → 2 steps per epoch
    summary = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="tiny", epochs=3,
                                batch_size=4, lr=0.01, warmup_epochs=1, warmup_lr=1e-5,
                                progress=False))
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert summary["steps"] == 6
    assert logged[:2] == [1e-5, 1e-5]  # the whole first epoch
    assert logged[2:] == pytest.approx([0.5 * 0.01 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_warmup_lr_is_what_the_optimiser_uses(tmp_path, tiny_config):
    """warmup_lr=0 for the only epoch: the prompts must not move (an lr set after the step, or
    never handed to the optimiser, would move them at the base lr)."""
    data = _folder(tmp_path / "data")
    summary = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="tiny", epochs=1,
                                batch_size=4, lr=0.5, warmup_epochs=1, warmup_lr=0.0, progress=False))
    start = MiraGe(tiny_config, seed=0)
    torch.testing.assert_close(summary["detector"].prompts.text, start.prompts.text, rtol=0, atol=0)


def test_negative_warmup_is_refused(tmp_path):
    with pytest.raises(ValueError, match="warmup_epochs"):
        train(TrainConfig(data=str(tmp_path), warmup_epochs=-1))


# ---- crop-only preprocessing -----------------------------------------------------------------
PP = {"size": 16, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bicubic",
      "resize_mode": "none"}


def _image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_crop_only_eval_is_the_centre_crop_of_the_pixels():
    rgb = _image(24, 30)
    out = eval_transform(PP)(Image.fromarray(rgb))
    assert out.shape == (3, 16, 16) and not is_variable_size(PP)
    crop = torch.from_numpy(rgb[4:20, 7:23]).permute(2, 0, 1).float() / 255  # no resampling
    torch.testing.assert_close(out, crop)


def test_crop_only_train_is_a_window_of_the_pixels():
    rgb = torch.from_numpy(_image(20, 22)).permute(2, 0, 1).float() / 255
    torch.manual_seed(3)
    out = train_transform(PP)(Image.fromarray(_image(20, 22)))
    assert out.shape == (3, 16, 16)
    windows = [src[:, i:i + 16, j:j + 16] for src in (rgb, rgb.flip(-1))
               for i in range(5) for j in range(7)]
    assert any(torch.allclose(out, w, atol=1e-6) for w in windows)


def test_crop_only_pads_small_images_like_univfd():
    """torchvision's CenterCrop (UnivFD's eval) zero-pads an image smaller than the crop."""
    rgb = _image(10, 12)
    out = eval_transform(PP)(Image.fromarray(rgb))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out[:, 3:13, 2:14], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert out[:, :3].abs().sum() == 0 and out[:, :, :2].abs().sum() == 0
    assert train_transform(PP)(Image.fromarray(rgb)).shape == (3, 16, 16)


def test_mirage_selects_crop_only_by_a_partial_preprocess(tiny_config):
    tiny_config.preprocess = {"resize_mode": "none"}
    m = MiraGe(tiny_config).eval()
    assert m.config.preprocess["resize_mode"] == "none" and m.config.preprocess["size"] == 32
    rgb = _image(50, 70)
    mean = torch.tensor(m.config.preprocess["mean"])[:, None, None]
    std = torch.tensor(m.config.preprocess["std"])[:, None, None]
    crop = torch.from_numpy(rgb[9:41, 19:51]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(m.preprocess(Image.fromarray(rgb))[0], (crop - mean) / std)


# ---- checkpoints -----------------------------------------------------------------------------
def test_round_trip_keeps_the_new_fields(tiny_config, tmp_path):
    tiny_config.prompt_init = "a photo of a"
    tiny_config.preprocess = {"resize_mode": "none"}
    m = MiraGe(tiny_config)
    with torch.no_grad():
        m.prompts.text.add_(0.1)  # "trained": differs from any fresh init
    m.save_pretrained(tmp_path)
    loaded = MiraGe.from_pretrained(tmp_path)
    assert loaded.config.prompt_init == "a photo of a"
    assert loaded.config.preprocess == m.config.preprocess
    assert loaded.config.sources == m.config.sources and "prompt_init" in loaded.config.sources
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], m(x)["logits"], rtol=0, atol=0)


def test_old_config_without_new_fields_still_loads(tiny_config, tmp_path):
    m = MiraGe(tiny_config)
    m.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("prompt_init", "sources"):
        del raw[key]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = MiraGe.from_pretrained(tmp_path)
    assert loaded.config.prompt_init == "random" and loaded.config.sources == {}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], m(x)["logits"], rtol=0, atol=0)
