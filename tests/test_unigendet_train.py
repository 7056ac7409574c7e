"""GDUF and DIGA on the tiny UniGenDet with tiny data made here."""
import itertools

import pytest
import torch

from aigid import backends
from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.train_unigendet import (EMA, DetectionItem, DIGAConfig, GDUFConfig, GenerationItem, _optimizer,
                                   diga_alignment, diga_layer_index, diga_trainable_names, gduf_losses,
                                   generation_batch, make_teacher, teacher_targets, train_diga, train_gduf)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g), size=32, mode="bilinear") * 2 - 1
    noisy = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    lat = torch.randn(6, 4, 4, 4, generator=g)
    det = [DetectionItem(smooth[0], 0, "real photo", lat[0]), DetectionItem(noisy[0], 1, "fake: noise", lat[1]),
           DetectionItem(smooth[1], 0, "real photo", lat[2]), DetectionItem(noisy[1], 1, "fake: noise", lat[3])]
    gen = [GenerationItem("a smooth image", smooth[0], lat[4]), GenerationItem("a noisy image", noisy[0], lat[5]),
           GenerationItem("a smooth image", smooth[0], lat[4]), GenerationItem("a noisy image", noisy[0], lat[5])]
    return det, gen


def _mean(xs):
    return sum(xs) / len(xs)


def test_gduf_losses_decrease():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    det, gen = _data()
    cfg = GDUFConfig(steps=30, lr=2e-3, text_dropout=0.0, seed=0)
    history, ema = train_gduf(model, itertools.repeat((det, gen)), cfg)
    assert len(history) == 30 and ema is None
    for key in ("loss", "det", "exp"):
        first, last = _mean([h[key] for h in history[:5]]), _mean([h[key] for h in history[-5:]])
        assert last < 0.7 * first, (key, first, last)
    assert _mean([h["fm"] for h in history[-5:]]) < _mean([h["fm"] for h in history[:5]])
    # the detector now separates the two kinds of image it was shown
    pixels = torch.stack([d.pixels for d in det])
    p = model.eval().predict(pixels, latents=torch.stack([d.latents for d in det]))
    assert (p[[1, 3]].min() > p[[0, 2]].max()), p


def test_gduf_rejects_unbalanced_batches_and_bad_labels():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    det, gen = _data()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="1:1"):
        gduf_losses(model, det, gen[:2] + gen[:1], GDUFConfig(), g)
    det[0].label = 2
    with pytest.raises(ValueError, match="0 \\(real\\) or 1 \\(fake\\)"):
        gduf_losses(model, det, gen, GDUFConfig(), g)


def test_non_finite_losses_raise():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    det, gen = _data()
    gen[0].latents = torch.full_like(gen[0].latents, float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_gduf(model, itertools.repeat((det, gen)), GDUFConfig(steps=2))


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    det, gen = _data()
    results = []
    for ckpt in (False, True):
        model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).train()
        model.gradient_checkpointing = ckpt
        out = gduf_losses(model, det, gen, GDUFConfig(text_dropout=0.0), torch.Generator().manual_seed(1))
        out["loss"].backward()
        results.append((out["loss"].detach(), model.language_model.model.layers[1].mlp_moe_gen.up_proj.weight.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_presets_optimizer_and_ema(capsys):
    code = GDUFConfig.code_preset()
    assert (code.lr, code.betas, code.eps, code.grad_clip, code.ema_decay, code.lambda_det) == \
        (2e-5, (0.9, 0.95), 1e-15, 1.0, 0.99, 0.2)
    paper = GDUFConfig()
    assert (paper.lr, paper.weight_decay, paper.lambda_det, paper.lambda_exp, paper.lambda_fm) == (1e-4, 1e-2, 1, 1, 1)
    d = DIGAConfig()
    assert (d.lam, d.layer, DIGAConfig.code_preset().ema_decay) == (0.5, 8, 0.95)
    lin = torch.nn.Linear(2, 2)
    if not backends.has_bitsandbytes():
        opt = _optimizer(list(lin.parameters()), GDUFConfig(optimizer="adamw8bit"))
        assert isinstance(opt, torch.optim.AdamW) and "AdamW8bit" in capsys.readouterr().err
    with pytest.raises(ValueError):
        _optimizer(list(lin.parameters()), GDUFConfig(optimizer="sgd"))
    ema = EMA(lin, 0.5)
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(2.0)
    ema.update(lin)
    assert torch.allclose(ema.shadow["weight"], before + 1.0)
    ema.copy_to(lin)
    assert torch.allclose(lin.weight, before + 1.0)


def test_diga_layer_rule():
    assert diga_layer_index(8, 28) == 7
    assert diga_layer_index(8, 4) == 3
    assert diga_layer_index(2, 4) == 1
    with pytest.raises(ValueError):
        diga_layer_index(0, 4)


def test_diga_trains_only_the_generation_side_and_leaves_the_teacher_alone():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    _, gen = _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = make_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    cfg = DIGAConfig(steps=30, lr=2e-3, text_dropout=0.0, layer=2)
    teacher_out, history, _ = train_diga(model, itertools.repeat(gen[:2]), cfg, teacher=teacher)
    assert teacher_out is teacher
    first, last = _mean([h["diga"] for h in history[:5]]), _mean([h["diga"] for h in history[-5:]])
    assert last < 0.8 * first, (first, last)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), n
    trainable = set(diga_trainable_names(model))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable
    assert any("layers.0.mlp_moe_gen" in n for n in moved) and "diga_mlp.0.weight" in moved
    frozen = [n for n in before if n not in trainable]
    assert any(n.endswith("layers.0.mlp.up_proj.weight") for n in frozen)       # und expert
    assert "fake_cls_head.3.weight" in frozen and "language_model.lm_head.weight" in frozen
    assert not any(n in moved for n in frozen)


def test_diga_gradient_reaches_the_generation_expert():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    _, gen = _data()
    teacher = make_teacher(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(diga_trainable_names(model)))
    index = diga_layer_index(2, 4)
    g = torch.Generator().manual_seed(0)
    batch, _, _, x0 = generation_batch(model, gen[:2], 1.0, 0.0, g)
    target = teacher_targets(teacher, torch.stack([it.pixels for it in gen[:2]]), x0, index, batch.grid)
    assert target.shape == (2, 4, 64) and not target.requires_grad
    out = model(gen=batch, return_layers=(index,))
    loss = diga_alignment(model, out, index, target)
    loss.backward()
    layers = model.language_model.model.layers
    for i in range(index + 1):   # every gen-expert layer up to the aligned one gets a gradient
        grad = layers[i].mlp_moe_gen.down_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, i
    for i in range(index + 1, len(layers)):  # later layers do not affect layer `index`
        assert layers[i].mlp_moe_gen.down_proj.weight.grad is None or \
            layers[i].mlp_moe_gen.down_proj.weight.grad.abs().sum() == 0
    assert layers[0].mlp.down_proj.weight.grad is None                      # und expert frozen
    assert model.llm2vae.weight.grad is None or model.llm2vae.weight.grad.abs().sum() == 0


def test_diga_needs_ground_truth_pixels():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    _, gen = _data()
    gen[0].pixels = None
    with pytest.raises(ValueError, match="ground-truth pixels"):
        train_diga(model, itertools.repeat(gen[:2]), DIGAConfig(steps=1))
