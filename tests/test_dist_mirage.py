"""MiraGe data-parallel (gloo, 2 processes spawned here): 2 ranks × batch b must compute what one
process computes with the global batch of 2b — the loss, the prompts' gradients, the weights and
the memory bank after several steps — and only rank 0 may write files (rank 1 runs in its own
working directory with a relative ``out``, which must stay empty)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from aigid.training import gather as dist_gather
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.training.mirage import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
# Global batches of the direct steps: 5 images cut 3 + 2 (unequal slices), then 2 cut 2 + 0 (a
# rank with no image); the bank starts with 6 past embeddings so it is part of the pool.
STEP_SIZES = (5, 2)
# 9 images (one unreadable) in global batches of 4: 2 steps an epoch, 3 epochs; the unreadable
# one makes some steps' slices unequal (2 + 1).
SETTINGS = dict(model="tiny", epochs=3, lr=0.05, seed=5, device="cpu", progress=False)
N_STEPS = 6


def _model():
    torch.manual_seed(0)  # the random tiny backbone
    model = MiraGe(MiraGeConfig.named("tiny"), seed=0)
    g = torch.Generator().manual_seed(1)
    model.bank.push(torch.nn.functional.normalize(torch.randn(6, 64, generator=g), dim=-1),
                    torch.tensor([0, 1, 1, 0, 1, 0]))
    return model


def _batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g))
            for n in STEP_SIZES]


def _direct_steps(rank=0, world=1):
    """Two SGD steps by hand; with ``world`` > 1 each rank takes its slice and gathers."""
    model = _model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    record = []
    for pixels, labels in _batches():
        if world > 1:
            keys = list(range(len(labels)))
            mine = dist_gather.rank_slice(keys, rank, world)
            sizes = [len(dist_gather.rank_slice(keys, r, world)) for r in range(world)]
            out = model.training_loss(pixels[mine], labels[mine], dist_gather.gatherer(sizes))
        else:
            out = model.training_loss(pixels, labels)
        opt.zero_grad()
        out["loss"].backward()
        if world > 1:
            dist_gather.average_gradients(params)
        record.append({"loss": out["loss"].item(), "ce": out["ce"].item(), "dis": out["dis"].item(),
                       "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}})
        opt.step()
    return record, model.trainable_state_dict(), [t.clone() for t in model.bank.view()]


def _folder(root):
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        os.makedirs(root / label)
        for i in range(4):
            img = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)
            if label == "fake":
                img[::4] = 255
            Image.fromarray(img).save(root / label / f"{i}.png")
    (root / "fake" / "corrupt.png").write_bytes(b"not a png")
    return root


def _crash_at_step(n):
    """MiraGe.training_loss raises on its n-th call on every rank (a crash at step n); returns
    the undo."""
    calls, real = [], MiraGe.training_loss

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real(self, *args)

    MiraGe.training_loss = crashing
    return lambda: setattr(MiraGe, "training_loss", real)


def _run_summary(summary):
    det = summary["detector"]
    return {"weights": det.trainable_state_dict(), "bank": [t.clone() for t in det.bank.view()],
            "steps": summary["steps"], "skipped": summary["skipped_files"]}


def _worker(rank, root, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        results = {"direct": _direct_steps(rank, WORLD)}
        os.chdir(os.path.join(root, f"rank{rank}"))  # out="det" is a different folder per rank
        cfg = dict(data=data, batch_size=4 // WORLD, **SETTINGS)
        results["train"] = _run_summary(train(TrainConfig(out="det", **cfg)))
        undo = _crash_at_step(4)
        try:
            train(TrainConfig(out="det2", checkpoint_every=2, **cfg))
        except RuntimeError as e:
            results["crash"] = str(e)
        finally:
            undo()
        resumed = train(TrainConfig(out="det2", checkpoint_every=2, resume=True, **cfg))
        results["resumed"] = {**_run_summary(resumed), "resumed_at": resumed["resumed_at_steps"]}
        torch.save(results, os.path.join(root, f"results{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank runs (direct steps, a training run, a crashed and resumed one) and the same on
    one process with the global batch."""
    root = tmp_path_factory.mktemp("dist")
    data = _folder(root / "data")
    for r in range(WORLD):
        os.makedirs(root / f"rank{r}")
    mp.spawn(_worker, args=(str(root), str(data)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"results{r}.pt", weights_only=False) for r in range(WORLD)]
    one = tmp_path_factory.mktemp("one")
    single = {"direct": _direct_steps(),
              "train": _run_summary(train(TrainConfig(data=str(data), out=str(one / "det"),
                                                      batch_size=4, **SETTINGS))),
              "log": _log(one / "det" / "train_log.jsonl")}
    return root, ranks, single


def _log(path):
    return [json.loads(line) for line in open(path)]


def _close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _close_to_scale(a, b, rel=1e-5):
    """|a - b| ≤ rel·max|b| per tensor: 2 ranks embed smaller batches than one process, so sums
    round differently (~1e-6 of the largest entry); a missing term is of the entries' size."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=rel * b[k].abs().max().item(),
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_first_step_loss_and_gradients_equal_one_process(runs):
    """2 ranks with slices 3 + 2 give the 1-process loss on the concatenated batch, and the same
    prompt gradients; then a step where rank 1 has no image. Catches a gather without autograd
    (or one whose backward keeps only this rank's gradient: the other rank's loss terms that
    use our rows are lost), CE averaged per rank (unequal slices), a pool or bank that misses
    the other rank's rows, and a rank with 0 rows left out of the step."""
    _, ranks, single = runs
    ref = single["direct"][0]
    for rank in ranks:
        for got, want in zip(rank["direct"][0], ref):
            for key in ("loss", "ce", "dis"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), key
            _close_to_scale(got["grads"], want["grads"])


def test_weights_and_bank_after_steps_equal_one_process(runs):
    """After the direct steps and after a 6-step ``train`` run (an unreadable image makes some
    slices unequal), every rank holds the 1-process weights and memory bank. Catches the bank
    pushed with the local rows only (or out of rank order), gradients summed instead of
    averaged, and per-rank batches that are not slices of the single-process global batch."""
    _, ranks, single = runs
    for rank in ranks:
        _, weights, bank = rank["direct"]
        _close(weights, single["direct"][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank[0], single["direct"][2][0], rtol=1e-5, atol=1e-6)
        assert torch.equal(bank[1], single["direct"][2][1])
        got, want = rank["train"], single["train"]
        assert got["steps"] == want["steps"] == N_STEPS
        assert got["skipped"] == want["skipped"] and len(want["skipped"]) == 1
        _close(got["weights"], want["weights"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["bank"][0], want["bank"][0], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["bank"][1], want["bank"][1])


def test_resume_under_ddp_ends_as_one_process(runs):
    """A 2-rank run that crashed at step 4 resumes from rank 0's step-2 checkpoint (rank 1
    never sees the file: its working directory differs) and ends with the 1-process weights and
    bank. Catches a resume that restores only rank 0, or ranks that disagree on the step."""
    _, ranks, single = runs
    for rank in ranks:
        assert rank["crash"] == "simulated crash"
        got = rank["resumed"]
        assert got["resumed_at"] == [2]
        _close(got["weights"], single["train"]["weights"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["bank"][0], single["train"]["bank"][0], rtol=1e-5, atol=1e-6)


def test_only_rank0_writes(runs):
    """Rank 1's working directory stays empty while rank 0's holds both detectors and their
    logs; catches any rank writing the detector, log or checkpoint."""
    root, _, single = runs
    assert os.listdir(root / "rank1") == []
    assert sorted(os.listdir(root / "rank0")) == ["det", "det2"]
    for name in ("det", "det2"):
        folder = root / "rank0" / name
        assert {"config.json", "model.safetensors", "train_log.jsonl"} <= set(os.listdir(folder))
        log = _log(folder / "train_log.jsonl")
        assert [r["step"] for r in log] == list(range(1, N_STEPS + 1))
        for key in ("loss", "acc", "lr"):  # the global batch's, as one process logs them
            assert [r[key] for r in log] == pytest.approx([r[key] for r in single["log"]], abs=1e-5)
        summary = json.load(open(folder / "train_summary.json"))
        assert summary["world_size"] == WORLD
