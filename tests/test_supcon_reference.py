"""MiraGe's L_dis (supcon_bank_loss): hand-computed values, gradients, edge cases, validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from aigid import ops


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def _empty_bank(d, dtype=torch.float64):
    return torch.zeros(0, d, dtype=dtype), torch.zeros(0, dtype=torch.long)


def test_hand_computed_case():
    # 2 images (labels 0, 1), 2 anchors, 1 bank entry of label 0; τ = 1 for easy arithmetic.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    anchors = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)  # label 0, label 1
    bank = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    loss = ops.supcon_bank_loss(feats, torch.tensor([0, 1]), bank, torch.tensor([0]),
                                anchors, torch.tensor([0, 1]), temperature=1.0)
    # row 0 keys (minus self): img1 s=0, anchor0 s=.6, anchor1 s=.8, bank s=-1; positives: anchor0, bank
    lse0 = math.log(math.exp(0) + math.exp(0.6) + math.exp(0.8) + math.exp(-1))
    l0 = -((0.6 - lse0) + (-1 - lse0)) / 2
    # row 1 keys: img0 s=0, anchor0 s=.8, anchor1 s=-.6, bank s=0; positive: anchor1
    lse1 = math.log(math.exp(0) + math.exp(0.8) + math.exp(-0.6) + math.exp(0))
    l1 = -(-0.6 - lse1)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-12)


def test_temperature_scales_logits():
    feats, anchors = _unit(4, 8), _unit(2, 8)
    labels, alabels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1])
    bank, blab = _empty_bank(8)
    # τ → the same loss as τ=1 on features scaled by 1/sqrt(τ) (both sides of the dot product)
    a = ops.supcon_bank_loss(feats, labels, bank, blab, anchors, alabels, temperature=0.25)
    b = ops.supcon_bank_loss(feats * 2, labels, bank, blab, anchors * 2, alabels, temperature=1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)


def test_gradcheck_feats_and_anchors():
    feats = _unit(5, 6).requires_grad_()
    anchors = _unit(2, 6).requires_grad_()
    bank = _unit(3, 6)
    labels, alabels, blabels = torch.tensor([0, 1, 1, 0, 2]), torch.tensor([0, 1]), torch.tensor([2, 0, 1])
    assert torch.autograd.gradcheck(
        lambda f, a: ops.supcon_bank_loss(f, labels, bank, blabels, a, alabels, 0.5),
        (feats, anchors))


def test_bank_is_detached_and_anchors_get_gradients():
    feats, anchors = _unit(4, 8).requires_grad_(), _unit(2, 8).requires_grad_()
    bank = _unit(6, 8).requires_grad_()
    loss = ops.supcon_bank_loss(feats, torch.tensor([0, 1, 0, 1]), bank, torch.tensor([0, 1] * 3),
                                anchors, torch.tensor([0, 1]), 0.1)
    loss.backward()
    assert bank.grad is None
    assert anchors.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0


def test_rows_without_positives_are_left_out_of_the_mean():
    feats = _unit(3, 4)
    bank, blab = _empty_bank(4)
    anchors, alab = _unit(1, 4), torch.tensor([0])
    labels = torch.tensor([0, 5, 0])  # row 1 has no positive anywhere
    full = ops.supcon_bank_loss(feats, labels, bank, blab, anchors, alab, 0.3)
    from aigid.kernels.reference import supcon_bank_loss_reference as ref
    rows = []
    for i in (0, 2):  # recompute the two valid rows' terms by hand from the pool
        pool = torch.cat([feats, anchors])
        pool_labels = torch.cat([labels, alab])
        keep = torch.arange(4) != i
        logits = pool[keep] @ feats[i] / 0.3
        lse = torch.logsumexp(logits, 0)
        pos = pool_labels[keep] == labels[i]
        rows.append(-(logits[pos] - lse).mean())
    assert full.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-10)
    assert ref(feats, labels, bank, blab, anchors, alab, 0.3).item() == pytest.approx(full.item())


def test_no_positive_anywhere_gives_zero_with_a_graph():
    feats = _unit(2, 4).requires_grad_()
    anchors = _unit(1, 4).requires_grad_()
    bank, blab = _empty_bank(4)
    loss = ops.supcon_bank_loss(feats, torch.tensor([1, 2]), bank, blab, anchors, torch.tensor([0]), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(feats.grad == 0) and torch.all(anchors.grad == 0)


def test_single_image_with_only_itself_is_finite():
    feats = _unit(1, 4).requires_grad_()
    bank, blab = _empty_bank(4)
    anchors, alab = torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    loss = ops.supcon_bank_loss(feats, torch.tensor([0]), bank, blab, anchors, alab, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()


def test_single_image_with_anchors():
    feats = _unit(1, 4)
    anchors = _unit(2, 4)
    bank, blab = _empty_bank(4)
    loss = ops.supcon_bank_loss(feats, torch.tensor([1]), bank, blab, anchors, torch.tensor([0, 1]), 0.2)
    s = anchors @ feats[0] / 0.2
    assert loss.item() == pytest.approx(-(s[1] - torch.logsumexp(s, 0)).item(), rel=1e-10)


@pytest.mark.parametrize("bad", ["dim", "labels_len", "float_labels", "bank_dim"])
def test_validation_errors(bad):
    feats, anchors = _unit(3, 4), _unit(2, 4)
    labels, alab = torch.tensor([0, 1, 0]), torch.tensor([0, 1])
    bank, blab = _empty_bank(4)
    if bad == "dim":
        feats = feats[None]
    elif bad == "labels_len":
        labels = labels[:2]
    elif bad == "float_labels":
        labels = labels.double()
    else:
        bank = torch.zeros(2, 5, dtype=torch.float64)
        blab = torch.tensor([0, 1])
    with pytest.raises((ValueError, TypeError)):
        ops.supcon_bank_loss(feats, labels, bank, blab, anchors, alab, 0.1)
