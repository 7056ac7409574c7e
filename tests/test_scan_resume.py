"""Resume: done items are not read again, another detector does not skip, and a scan killed with
SIGKILL and run again ends with exactly the table of an uninterrupted scan."""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

import aigid
import aigid.data.decode_cpu as decode_cpu
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.scanning.local import model_id, scan, scan_to_store
from aigid.scanning.store import ResultStore

N_GOOD, N_BAD = 192, 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """200 small JPEGs in two folders, 8 of them corrupt."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:03d}.jpg", quality=85)
    for i in range(N_BAD):
        (root / "b" / f"bad{i}.jpg").write_bytes(b"not a jpeg " * (i + 1))
    return root


def _detector_dir(tmp_path_factory, name, seed):
    torch.manual_seed(seed)
    out = tmp_path_factory.mktemp(name)
    MiraGe(MiraGeConfig.named("tiny"), seed=seed).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return _detector_dir(tmp_path_factory, "det", 0)


@pytest.fixture(scope="module")
def detector(detector_dir):
    return aigid.load_detector(str(detector_dir))


@pytest.fixture
def decodes(monkeypatch):
    """Counts images actually decoded (the expensive step resume must avoid)."""
    calls = []
    real = decode_cpu.decode_image

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(decode_cpu, "decode_image", counting)
    return calls


def _table(db, model):
    with ResultStore(db) as store:
        return {r.id: r for r in store.rows(model)}


def test_resume_skips_done_items(detector, images, tmp_path, decodes):
    db = tmp_path / "r.sqlite"
    first = scan_to_store([images], detector, out=db, batch_size=16, num_workers=0, progress=False)
    assert (first["scored"], first["errors"], first["skipped"]) == (N_GOOD, N_BAD, 0)
    assert len(decodes) == N_GOOD + N_BAD  # the corrupt ones reach the decoder too
    decodes.clear()
    second = scan_to_store([images], detector, out=db, batch_size=16, num_workers=0, progress=False)
    assert decodes == [] and (second["scored"], second["errors"]) == (0, 0)
    assert second["skipped"] == N_GOOD + N_BAD
    # --retry-errors reads only the errors again; --no-resume reads everything.
    retried = list(scan([images], detector, out=db, retry_errors=True, num_workers=0, progress=False))
    assert len(decodes) == N_BAD and {r.id for r in retried} == {
        str(images / "b" / f"bad{i}.jpg") for i in range(N_BAD)}
    decodes.clear()
    fresh = scan_to_store([images], detector, out=db, resume=False, num_workers=0, progress=False)
    assert len(decodes) == N_GOOD + N_BAD and fresh["skipped"] == 0
    with ResultStore(db) as store:
        assert store.count() == N_GOOD + N_BAD  # re-scored rows replaced, never duplicated
        assert len(store.runs()) == 4


def test_resume_with_workers_counts_skips(detector, images, tmp_path):
    db = tmp_path / "r.sqlite"
    gen = scan([images], detector, out=db, batch_size=8, num_workers=0, progress=False)
    head = [next(gen) for _ in range(40)]
    gen.close()
    done = len(_table(db, model_id(detector)))
    assert done >= len(head)
    stats = scan_to_store([images], detector, out=db, batch_size=8, num_workers=2, progress=False)
    assert stats["skipped"] == done and stats["scored"] + stats["errors"] == N_GOOD + N_BAD - done
    assert len(_table(db, model_id(detector))) == N_GOOD + N_BAD


def test_another_detector_does_not_skip(detector, images, tmp_path, tmp_path_factory, decodes):
    db = tmp_path / "r.sqlite"
    scan_to_store([images], detector, out=db, num_workers=0, progress=False)
    other = aigid.load_detector(str(_detector_dir(tmp_path_factory, "other", 1)))
    assert model_id(other) != model_id(detector)
    decodes.clear()
    stats = scan_to_store([images], other, out=db, num_workers=0, progress=False)
    assert len(decodes) == N_GOOD + N_BAD and stats["skipped"] == 0
    a, b = _table(db, model_id(detector)), _table(db, model_id(other))
    assert a.keys() == b.keys() and len(a) == N_GOOD + N_BAD
    assert any(abs(a[i].score - b[i].score) > 1e-6 for i in a if a[i].score is not None)


# A driver that runs the real CLI with a model slowed to ~0.05 s a batch, so the test can kill it
# mid-scan reliably (25 batches of 8).
DRIVER = textwrap.dedent("""
    import sys, time
    from aigid.models import mirage
    predict = mirage.MiraGe.predict
    def slow(self, images):
        time.sleep(0.05)
        return predict(self, images)
    mirage.MiraGe.predict = slow
    from aigid.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _count(db):
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_kill_and_resume_equals_a_clean_run(detector, detector_dir, images, tmp_path, decodes):
    db, clean = tmp_path / "killed.sqlite", tmp_path / "clean.sqlite"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "AIGID_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), "scan", str(images), "--detector",
                             str(detector_dir), "--out", str(db), "--batch-size", "8",
                             "--workers", "0", "--device", "cpu", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _count(db) == 0:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the scan never committed a batch"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    committed = _count(db)
    assert 0 < committed < N_GOOD + N_BAD, "killed too late to test anything"

    decodes.clear()
    stats = scan_to_store([images], detector, out=db, batch_size=8, num_workers=0, progress=False)
    assert stats["skipped"] == committed  # every committed row survived the kill
    assert len(decodes) == N_GOOD + N_BAD - committed  # and nothing committed was read again
    scan_to_store([images], detector, out=clean, batch_size=8, num_workers=0, progress=False)

    model = model_id(detector)
    resumed, reference = _table(db, model), _table(clean, model)
    assert resumed.keys() == reference.keys() and len(resumed) == N_GOOD + N_BAD
    for ident, ref in reference.items():
        got = resumed[ident]
        assert (got.hash, got.size, got.error, got.label) == (ref.hash, ref.size, ref.error, ref.label)
        if ref.score is None:
            assert got.score is None
        else:
            assert got.score == pytest.approx(ref.score, abs=1e-5)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM results").fetchone() == (200, 200)
