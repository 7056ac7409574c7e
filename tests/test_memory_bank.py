import torch

from aigid.models.mirage.memory_bank import MemoryBank


def test_fifo_order_and_wraparound():
    bank = MemoryBank(4, 1)
    bank.push(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 0, 1]))
    feats, labels = bank.view()
    assert feats.flatten().tolist() == [1, 2, 3] and labels.tolist() == [1, 0, 1]
    bank.push(torch.tensor([[4.0], [5.0]]), torch.tensor([0, 0]))
    feats, labels = bank.view()
    assert feats.flatten().tolist() == [2, 3, 4, 5] and labels.tolist() == [0, 1, 0, 0]


def test_push_larger_than_bank_keeps_newest():
    bank = MemoryBank(3, 1)
    bank.push(torch.arange(7.0)[:, None], torch.arange(7))
    assert bank.view()[0].flatten().tolist() == [4, 5, 6]


def test_entries_are_detached_and_empty_bank_is_empty():
    bank = MemoryBank(2, 3)
    assert bank.view()[0].shape == (0, 3)
    x = torch.randn(2, 3, requires_grad=True)
    bank.push(x, torch.tensor([0, 1]))
    assert not bank.view()[0].requires_grad
    MemoryBank(0, 3).push(x, torch.tensor([0, 1]))  # size 0: a no-op
