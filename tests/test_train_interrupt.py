"""Interrupt-safe training: Ctrl-C saves a checkpoint and resume=True ends where a run that was
never stopped ends; periodic checkpoints; a detector folder is replaced only whole and only with
overwrite; saved folders follow the umask and hold no absolute paths."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import aigid
import aigid.models.mirage.model as mirage_model
from aigid.models.mirage import MiraGe
from aigid.training.mirage import TrainConfig, train

# 8 images, batch 4: 2 steps an epoch; 4 epochs with one of warmup cross epoch boundaries and the
# warmup/cosine switch, and the bank (64) keeps every past batch, so all of it must be restored.
SETTINGS = dict(model="tiny", epochs=4, batch_size=4, lr=0.05, warmup_epochs=1, warmup_lr=0.01,
                seed=3, device="cpu", progress=False)
N_STEPS = 8


def _folder(root, n=4, corrupt=False):
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        os.makedirs(root / label)
        for i in range(n):
            img = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)
            if label == "fake":
                img[::4] = 255
            Image.fromarray(img).save(root / label / f"{i}.png")
    if corrupt:
        (root / "fake" / "corrupt.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The reference: the same run, never stopped."""
    out = tmp_path_factory.mktemp("straight") / "det"
    summary = train(TrainConfig(data=str(data), out=str(out), **SETTINGS))
    return summary, _log(out / "train_log.jsonl")


def _log(path):
    return [json.loads(line) for line in open(path)]


def _checkpoint_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["aigid"])


def _assert_same_run(summary, log, straight):
    ref_summary, ref_log = straight
    assert summary["steps"] == ref_summary["steps"] == N_STEPS
    assert [r["step"] for r in log] == list(range(1, N_STEPS + 1))
    assert [r["lr"] for r in log] == pytest.approx([r["lr"] for r in ref_log], rel=1e-12)
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], abs=1e-5)
    got, ref = summary["detector"].trainable_state_dict(), ref_summary["detector"].trainable_state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


# The real CLI, each optimiser step slowed to 0.3 s so the test can interrupt it mid-run.
DRIVER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    from aigid.models import mirage
    loss = mirage.MiraGe.training_loss
    def slow(self, *args):
        time.sleep(0.3)
        return loss(self, *args)
    mirage.MiraGe.training_loss = slow
    from aigid.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigint_saves_a_checkpoint_and_resume_equals_a_straight_run(data, straight, tmp_path):
    out = tmp_path / "runs" / "det"
    partial = tmp_path / "runs" / "det.partial"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), "train", str(data), "--model", "tiny", "--out", str(out),
           "--epochs", "4", "--batch-size", "4", "--lr", "0.05", "--warmup-epochs", "1",
           "--warmup-lr", "0.01", "--seed", "3", "--device", "cpu", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AIGID_QUIET": "0"})
    log_path = partial / "train_log.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training never logged two steps"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, -signal.SIGINT), stderr
    assert "--resume" in stderr and "resume=True" in stderr  # says how to go on
    assert not out.exists()  # nothing half-written where the detector will go
    meta = _checkpoint_meta(partial / "checkpoint.safetensors")
    done = meta["step"]
    assert 2 <= done < N_STEPS, "interrupted too late to test anything"
    assert len(_log(log_path)) == done  # the step in flight was finished, and logged once

    # The same command with --resume (the real CLI, in-process, at full speed) finishes the run.
    from aigid.cli import main
    assert main(cmd[2:] + ["--resume", "--quiet"]) == 0
    with open(out / "train_summary.json") as f:
        written = json.load(f)
    assert written["resumed_at_steps"] == [done]
    reloaded = aigid.load_detector(str(out))
    summary = {"steps": written["steps"], "detector": reloaded}
    _assert_same_run(summary, _log(out / "train_log.jsonl"), straight)
    assert not partial.exists() and "checkpoint.safetensors" not in os.listdir(out)


def test_periodic_checkpoint_after_a_crash_resumes_exactly(data, straight, tmp_path, monkeypatch):
    """A crash (not Ctrl-C) at step 6 of a run checkpointing every 4 steps: resume goes on from
    step 4, drops the two steps logged after it, and (with 2 loader workers this time) ends as
    the straight run did: augmentation does not depend on who loads an image."""
    out = tmp_path / "det"
    _crash_at_call(monkeypatch, 7, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainConfig(data=str(data), out=str(out), checkpoint_every=4, **SETTINGS))
    monkeypatch.undo()
    partial = tmp_path / "det.partial"
    assert _checkpoint_meta(partial / "checkpoint.safetensors")["step"] == 4
    assert len(_log(partial / "train_log.jsonl")) == 6
    assert not out.exists()

    summary = train(TrainConfig(data=str(data), out=str(out), resume=True, checkpoint_every=4,
                                **{**SETTINGS, "num_workers": 2}))
    _assert_same_run(summary, _log(out / "train_log.jsonl"), straight)
    assert summary["resumed_at_steps"] == [4]


def _crash_at_call(monkeypatch, n, exc):
    """MiraGe.training_loss raises ``exc`` on its ``n``-th call (step n), as a crash would."""
    calls, real = [], MiraGe.training_loss

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(self, *args)

    monkeypatch.setattr(MiraGe, "training_loss", crashing)


def test_resume_refuses_changed_settings_and_missing_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "det"
    with pytest.raises(FileNotFoundError, match="no interrupted run to resume"):
        train(TrainConfig(data=str(data), out=str(out), resume=True, **SETTINGS))
    _crash_at_call(monkeypatch, 1, KeyboardInterrupt())  # a hard stop before any checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(data), out=str(out), **SETTINGS))
    monkeypatch.undo()
    # Nothing to resume there, so a new run just starts; it crashes after its checkpoint at step 2.
    _crash_at_call(monkeypatch, 3, RuntimeError("crash"))
    with pytest.raises(RuntimeError, match="crash"):
        train(TrainConfig(data=str(data), out=str(out), checkpoint_every=2, **SETTINGS))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="'lr'"):  # resumed with another lr: refused, naming it
        train(TrainConfig(data=str(data), out=str(out), resume=True, **{**SETTINGS, "lr": 0.1}))
    # A fresh run over it is refused too (it would throw the checkpoint away) unless overwrite.
    with pytest.raises(FileExistsError, match=r"det\.partial.*--resume.*--overwrite"):
        train(TrainConfig(data=str(data), out=str(out), **SETTINGS))
    summary = train(TrainConfig(data=str(data), out=str(out), overwrite=True, **{**SETTINGS, "max_steps": 2}))
    assert summary["steps"] == 2 and summary["resumed_at_steps"] == []


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_existing_detector_is_kept_unless_overwrite(data, tmp_path):
    out = tmp_path / "det"
    train(TrainConfig(data=str(data), out=str(out), **{**SETTINGS, "max_steps": 1}))
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=f"{out}.*--overwrite"):
        train(TrainConfig(data=str(data), out=str(out), **SETTINGS))
    assert _snapshot(out) == before and not (tmp_path / "det.partial").exists()
    summary = train(TrainConfig(data=str(data), out=str(out), overwrite=True, **{**SETTINGS, "max_steps": 2}))
    assert summary["steps"] == 2 and len(_log(out / "train_log.jsonl")) == 2
    assert sorted(os.listdir(tmp_path)) == ["det"]  # no .partial or .old left behind
    # A folder of someone's files is not a detector: never replaced, even with overwrite.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a detector"):
        train(TrainConfig(data=str(data), out=str(other), overwrite=True, **SETTINGS))
    assert os.listdir(other) == ["holiday.jpg"]


def test_a_crash_while_saving_leaves_the_old_detector_intact(data, tmp_path, monkeypatch):
    out, partial = tmp_path / "det", tmp_path / "det.partial"
    train(TrainConfig(data=str(data), out=str(out), **{**SETTINGS, "max_steps": 1}))
    before = _snapshot(out)

    def disk_full(path, state):  # the first file half-written, then the disk is full
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mirage_model, "save_state_dict", disk_full)  # MiraGe.save_pretrained's writer
    with pytest.raises(OSError, match="No space"):
        train(TrainConfig(data=str(data), out=str(out), overwrite=True, **SETTINGS))
    monkeypatch.undo()
    assert _snapshot(out) == before
    # The finished training was checkpointed: a resume only has to write the folder.
    assert _checkpoint_meta(partial / "checkpoint.safetensors")["step"] == N_STEPS

    # The swap itself failing (the rename of the new folder) puts the old folder back.
    real_rename = os.rename

    def failing_rename(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output"):
        train(TrainConfig(data=str(data), out=str(out), overwrite=True, resume=True, **SETTINGS))
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert not (tmp_path / "det.old").exists() and (partial / "checkpoint.safetensors").exists()

    summary = train(TrainConfig(data=str(data), out=str(out), overwrite=True, resume=True, **SETTINGS))
    assert summary["steps"] == N_STEPS and len(_log(out / "train_log.jsonl")) == N_STEPS
    assert sorted(os.listdir(tmp_path)) == ["det"]
    assert _snapshot(out)["model.safetensors"] != before["model.safetensors"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_follow_the_umask(data, tmp_path, umask, mode):
    """safetensors creates files 0600: a folder trained by one user must still be readable by
    the service that scans with it when the umask allows it (and private when it does not)."""
    old = os.umask(umask)
    try:
        out = tmp_path / "det"
        train(TrainConfig(data=str(data), out=str(out), **{**SETTINGS, "max_steps": 1}))
    finally:
        os.umask(old)
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)}
    assert {"model.safetensors", "backbone.safetensors", "config.json"} <= modes.keys()
    assert modes == {name: mode for name in modes}
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def test_detector_folder_is_portable(tmp_path):
    """No absolute path in the folder's JSON files; it loads and scores the same after it is
    moved and its training data deleted. Image paths are recorded relative to the data."""
    data = _folder(tmp_path / "data", corrupt=True)
    out = tmp_path / "runs" / "det"
    summary = train(TrainConfig(data=str(data), out=str(out), **{**SETTINGS, "max_steps": 2}))
    for name in os.listdir(out):
        if name.endswith((".json", ".jsonl")):
            text = (out / name).read_text()
            assert str(tmp_path / "runs") not in text and ".partial" not in text, name
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["config"]["data"] == str(data)  # the data path as given
    assert saved["config"]["out"] == "det"
    assert saved["skipped_files"] == [{"path": os.path.join("fake", "corrupt.png"),
                                       "error": summary["skipped_files"][0]["error"]}]
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(out), str(moved))
    shutil.rmtree(data)
    pixels = torch.randn(3, 3, 32, 32)
    expected = summary["detector"].predict(pixels)
    torch.testing.assert_close(aigid.load_detector(str(moved)).predict(pixels), expected)
