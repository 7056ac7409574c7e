"""The results store behaves: no store unless asked, labels follow the threshold in force, foreign
files refused untouched, one writer at a time (also after a kill -9), and after a run the main
``.sqlite`` alone holds every row."""
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import aigid
from aigid.scanning.local import model_id, scan, scan_to_store
from aigid.scanning.store import (APPLICATION_ID, SCHEMA_VERSION, ResultStore, StoreError,
                         StoreLockedError)

N_GOOD = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def detector(tiny_mirage_folder):
    return aigid.load_detector(str(tiny_mirage_folder))


def _scan(images, detector, **kw):
    return list(scan([images], detector, batch_size=4, num_workers=0, progress=False, **kw))


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- no store unless asked


def test_scan_without_out_writes_nothing_and_yields_every_time(detector, images, tmp_path,
                                                                monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    first, second = _scan(images, detector), _scan(images, detector)
    assert len(first) == len(second) == N_GOOD + 1  # nothing was "resumed" away
    assert {r.id: r.score for r in first} == {r.id: r.score for r in second}
    assert _files(cwd) == [] and "bad.jpg" in _files(images) and len(_files(images)) == N_GOOD + 1
    with pytest.raises(TypeError):  # scan_to_store keeps results nowhere else: out is required
        scan_to_store([images], detector)
    assert _files(cwd) == []


# --------------------------------------------------------------------------- labels follow the threshold


def test_threshold_change_relabels_without_rescoring(detector, images, tmp_path):
    db, out = tmp_path / "r.sqlite", tmp_path / "r.jsonl"
    first = {r.id: r for r in _scan(images, detector, out=db, threshold=0.0)}
    assert all(r.label == 1 for r in first.values() if r.score is not None)
    scores = sorted(r.score for r in first.values() if r.score is not None)
    mid = (scores[N_GOOD // 2 - 1] + scores[N_GOOD // 2]) / 2  # half the images each side
    stats = scan_to_store([images], detector, out=db, threshold=mid, export=out, batch_size=4,
                          num_workers=0, progress=False)
    assert stats["skipped"] == N_GOOD + 1 and stats["scored"] == stats["errors"] == 0
    with ResultStore(db, readonly=True) as store:
        rows = {r.id: r for r in store.rows()}
        runs = store.runs()
        assert store.threshold(model_id(detector)) == mid
        explicit = {r.id: r.label for r in store.rows(threshold=0.0)}
    assert [r["threshold"] for r in runs] == [0.0, mid]
    for ident, r in first.items():
        row = rows[ident]
        assert row.score == r.score and row.run == runs[0]["run"]  # scored once, by run 1
        assert row.label == (None if r.score is None else int(r.score > mid))  # fake: score > t
        assert explicit[ident] == r.label  # a reader may ask for another threshold
    assert sorted(label for label in (r.label for r in rows.values()) if label is not None) == \
        [0] * (N_GOOD // 2) + [1] * (N_GOOD // 2)
    exported = {rec["id"]: rec["label"] for rec in map(json.loads, out.read_text().splitlines())}
    assert exported == {i: r.label for i, r in rows.items()}
    with ResultStore(db) as store:
        assert store.export(tmp_path / "all1.csv", threshold=1.0) == N_GOOD + 1
    with open(tmp_path / "all1.csv", newline="") as f:
        labels = {rec["id"]: rec["label"] for rec in csv.DictReader(f)}
    assert labels == {i: "" if r.score is None else "0" for i, r in rows.items()}  # scores < 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        next(scan([images], detector, out=None, threshold=7))


# --------------------------------------------------------------------------- foreign files


def _foreign_sqlite(path):
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (path TEXT, tag TEXT)")
        conn.execute("INSERT INTO photos VALUES ('a.jpg', 'cat')")
    conn.close()


def _lookalike(path):  # another program's table that happens to be called "results"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE results (id TEXT, value REAL)")
        conn.execute("CREATE TABLE runs (run INTEGER)")
    conn.close()


def _newer(path):
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.execute("CREATE TABLE results (x)")
    conn.close()


@pytest.mark.parametrize("make, message", [
    (_foreign_sqlite, "another program"),
    (_lookalike, "another program"),
    (_newer, "newer aigid"),
    (lambda p: p.write_bytes(b"id,score\na.jpg,0.5\n" * 40), "not an aigid results file"),
])
def test_foreign_file_is_refused_untouched(detector, images, tmp_path, make, message):
    folder = tmp_path / "out"
    folder.mkdir()
    db = folder / "theirs.sqlite"
    make(db)
    before, names = db.read_bytes(), _files(folder)
    with pytest.raises(StoreError, match=message) as err:
        ResultStore(db)
    assert str(db) in str(err.value)
    with pytest.raises(StoreError, match=message):
        _scan(images, detector, out=db)
    with pytest.raises(StoreError, match=message):
        ResultStore(db, readonly=True)
    assert db.read_bytes() == before and _files(folder) == names  # no -wal, -shm or .lock


def test_empty_file_is_initialised_and_marked(tmp_path):
    db = tmp_path / "new.sqlite"
    db.touch()
    ResultStore(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


_V0 = """
CREATE TABLE results (id TEXT NOT NULL, model TEXT NOT NULL, hash TEXT, size INTEGER, score REAL,
    label INTEGER, error TEXT, time REAL, PRIMARY KEY (id, model));
CREATE TABLE runs (run INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, detector TEXT,
    preprocess TEXT, threshold REAL, version TEXT, decoder TEXT, paths TEXT, started REAL,
    finished REAL, summary TEXT);
INSERT INTO runs (model, threshold) VALUES ('m', 0.5), ('m', 0.3);
INSERT INTO results VALUES ('a.jpg', 'm', 'h1', 10, 0.4, 0, NULL, 1.0),
                           ('b.jpg', 'm', 'h2', 11, 0.2, 0, NULL, 1.0),
                           ('c.jpg', 'm', NULL, NULL, NULL, NULL, 'unreadable', 1.0);
"""


def test_version0_file_is_read_then_migrated(tmp_path):
    """A file of aigid before the marks: a frozen label of 0.4 at threshold 0.5, then a rescan
    at 0.3 that skipped everything. Read as it is; migrated by the first writer."""
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(_V0)
    conn.close()
    before = db.read_bytes()
    with ResultStore(db, readonly=True) as store:
        assert {r.id: (r.label, r.run) for r in store.rows()} == {
            "a.jpg": (1, None), "b.jpg": (0, None), "c.jpg": (None, None)}
    assert db.read_bytes() == before
    with ResultStore(db) as store:
        assert [(r.id, r.score, r.label, r.error) for r in store.rows()] == [
            ("a.jpg", 0.4, 1, None), ("b.jpg", 0.2, 0, None), ("c.jpg", None, None, "unreadable")]
        assert [r["threshold"] for r in store.runs()] == [0.5, 0.3]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = [row[1] for row in conn.execute("PRAGMA table_info(results)")]
    conn.close()
    assert "label" not in cols and "run" in cols


# --------------------------------------------------------------------------- one writer


def test_second_writer_is_refused_until_the_first_closes(detector, images, tmp_path):
    db = tmp_path / "r.sqlite"
    first = ResultStore(db)
    try:
        with pytest.raises(StoreLockedError, match="another scan") as err:
            _scan(images, detector, out=db)
        assert str(db) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
        with pytest.raises(StoreLockedError):
            ResultStore(db)
        with ResultStore(db, readonly=True) as reader:  # readers are never blocked
            assert reader.count() == 0
    finally:
        first.close()
    assert len(_scan(images, detector, out=db)) == N_GOOD + 1
    assert _files(tmp_path) == ["r.sqlite"]  # the lock file goes with the writer; WAL truncated away


HOLDER = textwrap.dedent("""
    import sys, time
    from aigid.scanning.store import ResultStore
    store = ResultStore(sys.argv[1])
    print("ready", flush=True)
    time.sleep(600)
""")


def test_lock_dies_with_a_killed_writer(tmp_path):
    db = tmp_path / "r.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            ResultStore(db)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert os.path.exists(f"{db}.lock")  # left behind by the kill, but no longer locked
    ResultStore(db).close()
    assert not os.path.exists(f"{db}.lock")


# --------------------------------------------------------------------------- the main file alone


def test_main_file_alone_holds_every_row_after_a_run(detector, images, tmp_path):
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    # An open reader (a dashboard, `aigid export`) keeps SQLite from folding the WAL in on close:
    # only the scan's own checkpoint puts the rows into the main file.
    observer = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert observer.execute("SELECT COUNT(*) FROM results").fetchone() == (0,)
        _scan(images, detector, out=db)
        assert os.path.getsize(f"{db}-wal") == 0  # truncated
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copy(db, copy / "r.sqlite")  # the .sqlite alone
    finally:
        observer.close()
    with sqlite3.connect(copy / "r.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone() == (N_GOOD + 1,)
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE finished IS NOT NULL").fetchone() == (1,)
    conn.close()
