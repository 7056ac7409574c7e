"""GDUF and DIGA on the tiny UniGenDet with tiny data made here."""
import itertools
from dataclasses import replace

import pytest
import torch

from aigid import backends
from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.training.unigendet.common import EMA, DetectionItem, DIGAConfig, GDUFConfig, GenerationItem, generation_batch
from aigid.training.unigendet.gduf import detection_batch, gduf_losses, mixed_batches, train_gduf
from aigid.training.unigendet.loop import _optimizer, _scheduler, warmup_factor
from aigid.training.unigendet.diga import (DIGA_CODE_PROMPT, diga_alignment, diga_layer_index, diga_losses,
                                        diga_trainable_names, make_teacher, teacher_inputs, teacher_targets,
                                        train_diga)


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_presets_optimizer_and_ema(caplog):
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
        assert isinstance(opt, torch.optim.AdamW) and "AdamW8bit" in caplog.text
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


# ---- the released scripts' recipe: warm-up, data mix, weight decay, DIGA teacher prompt --------
def test_warmup_schedule_linear_then_constant():
    lin = torch.nn.Linear(2, 2)
    cfg = GDUFConfig(lr=2e-5, warmup_steps=2000)
    opt = _optimizer(list(lin.parameters()), cfg)
    sched = _scheduler(opt, cfg)
    lrs = []
    for _ in range(5001):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = {0: 0.0, 1000: 1e-5, 1999: 2e-5 * 1999 / 2000, 2000: 2e-5, 5000: 2e-5}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-9, abs=1e-15), (step, lrs[step])
    assert [warmup_factor(s, 0) for s in (0, 1, 10)] == [1.0, 1.0, 1.0]   # paper preset: constant
    assert GDUFConfig().warmup_steps == 0
    assert GDUFConfig.code_preset().warmup_steps == 2000 and DIGAConfig.code_preset().warmup_steps == 2000


def test_training_steps_follow_the_warmup():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    det, gen = _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = GDUFConfig(steps=1, lr=1e-3, warmup_steps=4, text_dropout=0.0)
    history, _ = train_gduf(model, itertools.repeat((det[:2], gen[:2])), cfg)
    assert history[0]["lr"] == 0.0                 # step 0 of the warm-up runs at lr 0: nothing moves
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    history, _ = train_gduf(model, itertools.repeat((det[:2], gen[:2])), replace(cfg, steps=6))
    assert [h["lr"] for h in history] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_code_preset_optimizer_has_no_weight_decay():
    lin = torch.nn.Linear(2, 2)
    for cfg in (GDUFConfig.code_preset(), DIGAConfig.code_preset()):
        groups = _optimizer(list(lin.parameters()), cfg).param_groups
        assert [g["weight_decay"] for g in groups] == [0.0] * len(groups)
        assert groups[0]["lr"] == 2e-5 and groups[0]["betas"] == (0.9, 0.95) and groups[0]["eps"] == 1e-15
    assert _optimizer(list(lin.parameters()), GDUFConfig()).param_groups[0]["weight_decay"] == 1e-2
    code = GDUFConfig.code_preset()
    assert (code.mix, code.det_weight, code.gen_weight) == ("weighted", 5.0, 1.0)
    assert (DIGAConfig.code_preset().teacher_prompt, DIGAConfig().teacher_prompt) == ("code", "default")


def _counts(cfg, batch_size, n_batches):
    det_src, gen_src = itertools.count(), (-i - 1 for i in itertools.count())
    batches = list(itertools.islice(mixed_batches(det_src, gen_src, batch_size, cfg), n_batches))
    return batches, [(len(d), len(g)) for d, g in batches]


def test_weighted_mix_draws_each_sample_source_by_weight():
    batches, counts = _counts(GDUFConfig.code_preset(seed=3), 14, 1000)
    assert all(d >= 1 and g >= 1 and d + g == 14 for d, g in counts)   # each batch opens with one of each
    free_det = sum(d - 1 for d, _ in counts)
    free_gen = sum(g - 1 for _, g in counts)
    assert 4.6 < free_det / free_gen < 5.5, (free_det, free_gen)
    assert len({c for c in counts}) > 3                                 # per-sample draws, not fixed splits
    flat_det = [x for d, _ in batches for x in d]
    assert flat_det == list(range(len(flat_det)))                       # sources consumed in order, none lost
    assert _counts(GDUFConfig.code_preset(seed=3), 14, 50)[1] == counts[:50]   # seeded
    assert _counts(GDUFConfig.code_preset(seed=4), 14, 50)[1] != counts[:50]
    _, even = _counts(GDUFConfig(mix="weighted", seed=0), 14, 1000)
    assert 0.9 < sum(d - 1 for d, _ in even) / sum(g - 1 for _, g in even) < 1.1


def test_default_mix_is_paired_one_to_one():
    _, counts = _counts(GDUFConfig(), 6, 20)
    assert counts == [(3, 3)] * 20
    with pytest.raises(ValueError, match="even"):
        next(mixed_batches(iter(range(9)), iter(range(9)), 5, GDUFConfig()))
    with pytest.raises(ValueError, match="weighted"):
        GDUFConfig(det_weight=5.0)
    # a finite source ends the stream
    assert len(list(mixed_batches(iter(range(7)), iter(range(100)), 4, GDUFConfig()))) == 3


def test_weighted_batches_train_with_any_mix():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    det, gen = _data()
    cfg = GDUFConfig.code_preset(text_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    out = gduf_losses(model, det[:3], gen[:1], cfg, g)
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    only_det = gduf_losses(model, det[:2], [], cfg, g)
    assert only_det["fm"] == 0 and only_det["det"] > 0
    only_gen = gduf_losses(model, [], gen[:2], cfg, g)
    assert only_gen["det"] == 0 and only_gen["exp"] == 0 and only_gen["fm"] > 0
    history, _ = train_gduf(model, mixed_batches(itertools.cycle(det), itertools.cycle(gen), 4, cfg),
                            replace(cfg, steps=3))
    assert [h["lr"] for h in history] == pytest.approx([0.0, 1e-8, 2e-8])


def _sized(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w),
                                           mode="bilinear")[0] * 2 - 1


def test_detection_batches_with_mixed_image_sizes_train():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    g = torch.Generator().manual_seed(0)
    # no latents: the VAE encodes each image at its own size (latent grids 2x2, 2x3, 3x2 tokens)
    det = [DetectionItem(_sized(32, 32, 0), 0, "real photo"),
           DetectionItem(_sized(32, 48, 1) + 0.3 * torch.randn(3, 32, 48, generator=g), 1, "fake: noise"),
           DetectionItem(_sized(48, 32, 2), 0, "real photo"),
           DetectionItem(_sized(32, 32, 3) + 0.3 * torch.randn(3, 32, 32, generator=g), 1, "fake: noise")]
    gen = [GenerationItem("a smooth image", _sized(32, 32, 4)), GenerationItem("a noisy image", _sized(32, 32, 5)),
           GenerationItem("a smooth image", _sized(32, 32, 4)), GenerationItem("a noisy image", _sized(32, 32, 5))]
    batch, _ = detection_batch(model, det)
    out = model(det=batch)
    assert isinstance(out.vit_grid, list) and len(set(out.vit_grid)) == 3
    assert [tuple(z.shape[-2:]) for z in batch.latents] == [(4, 4), (4, 6), (6, 4), (4, 4)]
    history, _ = train_gduf(model, itertools.repeat((det, gen)), GDUFConfig(steps=8, lr=2e-3, text_dropout=0.0))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert _mean([h["loss"] for h in history[-2:]]) < 0.9 * _mean([h["loss"] for h in history[:2]])


def test_generation_items_of_different_sizes_in_one_batch_raise():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    gen = [GenerationItem("a", _sized(32, 32, 0)), GenerationItem("b", _sized(32, 48, 1))]
    with pytest.raises(ValueError, match="share a size"):
        generation_batch(model, gen, 1.0, 0.0, torch.Generator().manual_seed(0))
    gen = [GenerationItem("a", _sized(32, 32, 0), torch.randn(4, 4, 4)),
           GenerationItem("b", _sized(32, 48, 1), torch.randn(4, 4, 6))]
    with pytest.raises(ValueError, match="share a size"):
        train_diga(model, itertools.repeat(gen), DIGAConfig(steps=1))


def test_diga_code_teacher_puts_the_forensic_prompt_between_vae_and_vit():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    teacher = make_teacher(model)
    tok = teacher.tokenizer
    _, gen = _data()
    pixels, latents = [it.pixels for it in gen[:2]], torch.stack([it.latents for it in gen[:2]])
    captions = ["a smooth image", "a noisy image"]
    seen = []
    hook = teacher.language_model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].tolist()))
    try:
        det = teacher_inputs(teacher, pixels, latents, prompts=captions, teacher_prompt="code")
        out = teacher(det=det)
    finally:
        hook.remove()
    mids = [tok.encode(DIGA_CODE_PROMPT.format(caption=c)) for c in captions]
    assert det.mid_ids == mids and det.question_ids == [None, None]
    assert tok.decode(mids[1]).startswith('Act as a forensic image analyst. The image was generated for the '
                                          'prompt: "a noisy image".')
    for i in range(2):
        splits = out.layout.samples[i]
        assert [s.kind for s in splits] == ["vae", "text", "vit", "text"]
        assert splits[1].length == len(mids[i]) + 2 and splits[3].length == 1
    # the text ids in pack order: VAE markers, <|im_start|> prompt <|im_end|>, ViT markers, <|im_start|>
    vs, ve, ims, ime = tok.vision_start, tok.vision_end, tok.im_start, tok.im_end
    expected = [x for m in mids for x in [vs, ve, ims, *m, ime, vs, ve, ims]]
    assert seen[-1] == expected
    default = teacher_inputs(teacher, pixels, latents)
    assert default.mid_ids is None
    assert [s.kind for s in teacher(det=default).layout.samples[0]] == ["vae", "vit", "text", "text"]
    # targets keep the latent grid's shape, and the ViT tokens do read the prompt before them
    index = diga_layer_index(2, 4)
    code_t = teacher_targets(teacher, pixels, latents, index, (2, 2), prompts=captions, teacher_prompt="code")
    default_t = teacher_targets(teacher, pixels, latents, index, (2, 2))
    assert code_t.shape == default_t.shape == (2, 4, 64)
    assert not torch.allclose(code_t, default_t)
    with pytest.raises(ValueError, match="caption"):
        teacher_inputs(teacher, pixels, latents, teacher_prompt="code")


def test_teacher_targets_per_image_grids_and_code_diga_trains():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    teacher = make_teacher(model)
    index = diga_layer_index(2, 4)
    pixels = [_sized(32, 32, 0), _sized(32, 48, 1)]
    latents = [torch.randn(4, 4, 4), torch.randn(4, 4, 6)]
    mixed = teacher_targets(teacher, pixels, latents, index, (2, 3))
    assert mixed.shape == (2, 6, 64)
    alone = teacher_targets(teacher, pixels[1:], latents[1:], index, (2, 3))
    assert torch.allclose(mixed[1], alone[0], atol=1e-5)    # image 1 resized from its own 4x6 ViT grid
    _, gen = _data()
    losses = {mode: diga_losses(model, teacher, gen[:2], DIGAConfig(layer=2, text_dropout=0.0, teacher_prompt=mode),
                                torch.Generator().manual_seed(0)) for mode in ("default", "code")}
    assert torch.equal(losses["code"]["fm"], losses["default"]["fm"])      # same student pass
    assert not torch.allclose(losses["code"]["diga"], losses["default"]["diga"])  # the teacher read the prompt
    cfg = DIGAConfig(steps=20, lr=2e-3, text_dropout=0.0, layer=2, teacher_prompt="code")
    _, history, _ = train_diga(model, itertools.repeat(gen[:2]), cfg, teacher=teacher)
    assert _mean([h["diga"] for h in history[-4:]]) < 0.8 * _mean([h["diga"] for h in history[:4]])
