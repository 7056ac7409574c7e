"""Pins for bugs that once slipped through the suite (issue 18): each test names its bug.

Every test here was checked by planting its bug once and seeing it fail (see the issue note).
"""
from __future__ import annotations

import io
import math
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from adversarial_corpus import bomb_png, build_corpus, jpeg_bytes
from PIL import Image

from aigid import ops
from aigid.data.batches import iter_batches
from aigid.data.decode_cpu import decode_image
from aigid.data.decode_dali import dali_eligible
from aigid.data.images import ImageError, load_rgb
from aigid.data.labelled import discover
from aigid.data.sources import LINK_MEMBER, Item, ItemError, iter_items, read_items
from aigid.data.transforms import eval_transform

PP = {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}


# ---- ForenSynths labels ----------------------------------------------------------------------

def test_forensynths_label_of_each_path(tmp_path):
    """Bug: ``0_real`` and ``1_fake`` swapped in the label table. A set of (generator, label)
    pairs is unchanged by a swap, so this pins the label of every path."""
    want = {}
    for gen, cls in (("progan", "car"), ("progan", "cat"), ("stylegan", "bedroom")):
        for folder, label in (("0_real", 0), ("1_fake", 1)):
            path = tmp_path / gen / cls / folder / f"{gen}_{cls}.png"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"")  # discover reads names only
            want[str(path)] = (label, gen)
    got = {s.path: (s.label, s.generator) for s in discover(str(tmp_path))}
    assert got == want


# ---- decompression bombs between 1x and 2x Pillow's limit ----------------------------------

def test_bomb_between_one_and_two_limits_is_refused_at_the_real_limit():
    """Bug: the loader's ``DecompressionBombWarning`` filter loosened (ignored, or left at the
    default), so an image declaring between 1x and 2x ``Image.MAX_IMAGE_PIXELS`` is decoded
    (Pillow itself raises only above 2x). Pillow's real default limit, a header-only PNG."""
    limit = Image.MAX_IMAGE_PIXELS
    side = math.isqrt(int(1.25 * limit))
    assert limit < side * side <= 2 * limit  # really in the band that only a warning guards
    data = bomb_png(side, side, gray=True)
    with pytest.raises(ImageError, match="decompression bomb refused"):
        load_rgb(data)
    with pytest.raises(ImageError, match="decompression bomb refused"):
        decode_image(data, eval_transform(PP))  # the bulk scan's CPU path


def test_bomb_band_with_a_lowered_limit_decodes_nothing(monkeypatch):
    """Bug: as above, seen with a *valid* image: with the guard loosened it decodes and scores.
    Lowering ``Image.MAX_IMAGE_PIXELS`` is faithful: Pillow reads the module global at each open.
    Also pins that an image exactly at the limit loads, and that the DALI router sends the band
    to PIL (which refuses it) rather than decoding it on the GPU."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    in_band = jpeg_bytes(40, 30)  # 1200 pixels: 1.2x the limit
    with pytest.raises(ImageError, match="decompression bomb refused"):
        load_rgb(in_band)
    with pytest.raises(ImageError, match="decompression bomb refused"):
        decode_image(in_band, eval_transform(PP))
    assert not dali_eligible(in_band)
    assert load_rgb(jpeg_bytes(40, 25)).size == (40, 25)  # exactly 1000 pixels: fine
    with warnings.catch_warnings():  # the guard leaves the caller's warning filters alone
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError):
            load_rgb(in_band)
        assert warnings.filters[0][:3:2] == ("ignore", Image.DecompressionBombWarning)


# ---- MoT routing -----------------------------------------------------------------------------

def test_a_pack_of_only_generation_tokens_uses_only_the_generation_expert(one_thread):
    """Bug: a pack with no understanding tokens routed to the understanding expert (the lone-
    expert shortcut taking the wrong branch). Mirror of the understanding-only test in
    test_mot.py: every ``*_moe_gen`` weight gets a gradient, no understanding weight does."""
    from aigid.models.unigendet.mot import MoTConfig, MoTForCausalLM
    from aigid.ops.packing import PackedLayout, Split

    cfg = MoTConfig.named("tiny")
    lm = MoTForCausalLM(cfg).double()
    layout = PackedLayout.build([[Split(4, "vae")], [Split(3, "vae")]])
    assert layout.und_index.numel() == 0 and layout.gen_index.numel() == layout.total
    x = torch.randn(layout.total, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    lm.model(x, layout).last_hidden_state.sum().backward()
    grads = {n: p.grad for n, p in lm.model.named_parameters()}
    gen = [n for n in grads if "moe_gen" in n]
    und = [n for n in grads if "moe_gen" not in n and "embed" not in n]
    assert gen and und
    assert all(grads[n] is None for n in und), [n for n in und if grads[n] is not None]
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in gen)


# ---- DIGA's loss composition -----------------------------------------------------------------

def test_diga_total_is_flow_plus_lambda_alignment(one_thread):
    """Bug: DIGA's total loss ignoring λ (or dropping/detaching the alignment term). The total
    must be L_flow + λ·L_align: λ=0 gives the flow loss, changing λ moves the total by exactly
    Δλ·L_align, and the alignment head's gradient scales with λ."""
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig
    from aigid.training.unigendet.common import DIGAConfig, GenerationItem
    from aigid.training.unigendet.diga import diga_losses, make_teacher

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 4, 4, generator=g)
    items = [GenerationItem("a photo", pixels[0], latents[0]), GenerationItem("a drawing", pixels[1], latents[1])]
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    teacher = make_teacher(model)

    def run(lam):
        model.zero_grad()
        out = diga_losses(model, teacher, items, DIGAConfig(layer=2, text_dropout=0.0, lam=lam),
                          torch.Generator().manual_seed(0))
        out["loss"].backward()
        head = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                          for p in model.diga_mlp.parameters()])
        return out["loss"].detach(), out["fm"], out["diga"], head

    runs = {lam: run(lam) for lam in (0.0, 0.5, 2.0)}
    fm, align = runs[0.0][1], runs[0.0][2]
    assert align > 1e-3  # the alignment term is not ~0, so the checks below have teeth
    for lam, (loss, fm_l, align_l, _) in runs.items():
        assert torch.equal(fm_l, fm) and torch.equal(align_l, align)  # same student and teacher pass
        torch.testing.assert_close(loss, fm + lam * align, rtol=1e-6, atol=1e-7)
    assert torch.equal(runs[0.0][0], fm)
    torch.testing.assert_close(runs[2.0][0] - runs[0.5][0], 1.5 * align, rtol=1e-5, atol=1e-7)
    assert runs[0.0][3].abs().max() == 0  # the head is trained only through λ·L_align
    torch.testing.assert_close(runs[2.0][3], 4 * runs[0.5][3], rtol=1e-4, atol=1e-9)
    assert runs[0.5][3].abs().max() > 0


# ---- hardlink members of a tar ---------------------------------------------------------------

def _tar(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        data = jpeg_bytes(seed=5)
        info = tarfile.TarInfo("img/a.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, target in (("img/hard.jpg", "img/a.jpg"), ("img/outside.jpg", "/etc/hostname")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.LNKTYPE, target
            tf.addfile(link)


def test_tar_hardlinks_become_error_rows_not_nothing(tmp_path):
    """Bug: hardlink members of a tar silently dropped (only symlinks refused; ``isfile()`` is
    False for a hardlink, so it fell through to "nothing to score"): an item vanishes without a
    row, breaking "every item scored or refused exactly once". Hardlinks are refused like
    symlinks: the streaming reader keeps no member index to resolve them, and one to a member of
    the same archive would only score that member's bytes twice."""
    arc = tmp_path / "links.tar"
    _tar(arc)
    got = list(iter_items([arc]))
    assert [g.id for g in got] == [f"{arc}::img/a.jpg", f"{arc}::img/hard.jpg", f"{arc}::img/outside.jpg"]
    assert isinstance(got[0], Item)
    assert [(type(g), g.reason) for g in got[1:]] == [(ItemError, LINK_MEMBER)] * 2
    (read,) = read_items([got[0]])
    assert read[1] is not None and read[2] is None  # the regular member is still read
    outcome = {}
    for batch in iter_batches([arc], PP, 2):
        for rec in batch.records:
            outcome[rec.id] = outcome.get(rec.id, ()) + ("ok",)
        for rec in batch.errors:
            outcome[rec.id] = outcome.get(rec.id, ()) + (rec.error,)
    assert outcome == {f"{arc}::img/a.jpg": ("ok",), f"{arc}::img/hard.jpg": (LINK_MEMBER,),
                       f"{arc}::img/outside.jpg": (LINK_MEMBER,)}


def test_hostile_corpus_has_hardlinks_refused(tmp_path):
    """Bug: as above, in the shared hostile corpus that the scan tests check "every item scored or
    refused exactly once" against: the hardlink members must be enumerated, as refusals."""
    root = tmp_path / "corpus"
    expected = build_corpus(root)
    evil = f"{root}/shards/evil.tar"
    assert expected[f"{evil}::hard.jpg"] == expected[f"{evil}::hard_out.jpg"] == "error"
    reasons = {g.id: g.reason for g in iter_items([root / "shards" / "evil.tar"]) if isinstance(g, ItemError)}
    assert reasons[f"{evil}::hard.jpg"] == reasons[f"{evil}::hard_out.jpg"] == LINK_MEMBER


# ---- MiraGe's memory-bank order --------------------------------------------------------------

def test_mirage_bank_is_read_before_the_batch_is_pushed(tiny_config):
    """Bug: the batch pushed into the memory bank *before* the loss reads it, so each embedding
    is contrasted with its own detached copy. With an empty bank the first ``training_loss`` must
    equal ce + α·supcon_bank_loss with an empty bank; the second reads exactly the first batch."""
    import torch.nn.functional as F

    from aigid.models.mirage import MiraGe

    model = MiraGe(tiny_config)
    assert model.bank.filled == 0 and tiny_config.alpha > 0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor(y)) for y in ([0, 1, 0, 1], [1, 1, 0, 0])]
    tau, alpha = tiny_config.temperature, tiny_config.alpha

    def expected(pixels, labels, bank_feats, bank_labels):
        with torch.no_grad():
            out = model(pixels)
            anchor_labels = torch.arange(out["anchors"].shape[0])
            dis = ops.supcon_bank_loss(out["image_embeds"], labels, bank_feats, bank_labels,
                                       out["anchors"], anchor_labels, tau)
            return F.cross_entropy(out["logits"], labels) + alpha * dis, out["image_embeds"]

    (x1, y1), (x2, y2) = batches
    dim = model.bank.feats.shape[1]
    want1, h1 = expected(x1, y1, torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
    got1 = model.training_loss(x1, y1)["loss"]
    torch.testing.assert_close(got1.detach(), want1)
    assert model.bank.filled == 4
    torch.testing.assert_close(model.bank.view()[0], h1)  # pushed after, all of it
    want2, _ = expected(x2, y2, h1, y1)
    torch.testing.assert_close(model.training_loss(x2, y2)["loss"].detach(), want2)
