"""The SQLite results store: WAL, one transaction per write, unique (id, model), exports."""
import csv
import json
import os
import pickle
import sqlite3
import sys

import pytest

from aigid.scanning.store import COLUMNS, DoneFilter, ResultRow, ResultStore, display_id, encode_id

NONUTF8 = os.fsdecode(b"/data/caf\xe9.jpg")  # what os.fsdecode makes of a Latin-1 file name


def _rows(model="m1"):
    return [
        ResultRow("/data/a.jpg", model, "aa" * 16, 1234, 0.25, 0, None, 100.0),
        ResultRow("/data/shard.tar::x/b.png", model, "bb" * 16, 99, 0.875, 1, None, 100.5),
        ResultRow("/data/broken.jpg", model, "cc" * 16, 7, None, None, "cannot decode: bad", 101.0),
        ResultRow("/data/gone.jpg", model, None, None, None, None, "file not found", 101.0),
        ResultRow(NONUTF8, model, "dd" * 16, 5, 1 / 3, 0, None, 102.0),
        ResultRow('/data/odd, "quoted"\nname.jpg', model, "ee" * 16, 6, 0.5, 0, None, 103.0),  # on 0.5: real
    ]


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as s:
        yield s


def test_round_trip_and_pragmas(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store.write(_rows()) == 6
    got = sorted(store.rows(), key=lambda r: r.id)
    assert got == sorted(_rows(), key=lambda r: r.id)
    assert store.count("m1") == 6 and store.count("m1", errors=True) == 2
    assert store.done_ids("m1") == {r.id for r in _rows()}
    assert store.done_ids("m1", include_errors=False) == {r.id for r in _rows() if r.error is None}
    assert store.done_ids("other") == set()


def test_nonutf8_id_is_exact_unique_and_stable(store):
    # The escaped display form of the non-UTF-8 name is also a legal (different) file name.
    lookalike = display_id(encode_id(NONUTF8))
    assert lookalike == "/data/caf\\xe9.jpg"
    store.write([ResultRow(NONUTF8, "m", "x", 1, 0.1, 0, None, 1.0),
                 ResultRow(lookalike, "m", "y", 2, 0.9, 1, None, 1.0)])
    assert store.count("m") == 2
    assert store.done_ids("m") == {NONUTF8, lookalike}
    assert os.fsencode(next(r.id for r in store.rows() if r.hash == "x")) == b"/data/caf\xe9.jpg"


def test_primary_key_prevents_duplicates(store):
    store.write(_rows())
    store.write(_rows())  # the same ids again: replaced, not added
    assert store.count() == 6
    with pytest.raises(sqlite3.IntegrityError):
        with store.conn:
            store.conn.execute("INSERT INTO results (id, model) VALUES (?, ?)", ("/data/a.jpg", "m1"))
    # A newer result replaces the old one (how --retry-errors turns an error into a score).
    store.write([ResultRow("/data/broken.jpg", "m1", "cc" * 16, 7, 0.6, 1, None, 200.0)])
    row = next(r for r in store.rows() if r.id == "/data/broken.jpg")
    assert (row.score, row.label, row.error, row.time) == (0.6, 1, None, 200.0)
    # The same id under another detector is another row.
    store.write(_rows("m2")[:1])
    assert store.count() == 7 and store.models() == ["m1", "m2"]


def test_write_is_all_or_nothing(store):
    store.write(_rows()[:1])
    bad = _rows()[1:3] + [ResultRow("/data/z.jpg", None, None, None, None, None, "x", 1.0)]  # model NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        store.write(bad)
    assert store.done_ids("m1") == {"/data/a.jpg"}  # none of the failed batch landed


def test_done_filter_pickles_and_sees_new_rows(store):
    store.write(_rows()[:3])
    done = pickle.loads(pickle.dumps(store.done_filter("m1")))
    assert done("/data/a.jpg") and done("/data/broken.jpg") and not done("/data/gone.jpg")
    store.write(_rows()[3:])
    assert done("/data/gone.jpg") and done(NONUTF8)
    strict = DoneFilter(store.path, "m1", include_errors=False)
    assert strict("/data/a.jpg") and not strict("/data/broken.jpg")
    assert not done("/data/never.jpg") and not DoneFilter(store.path, "m2")("/data/a.jpg")


def test_runs_record_what_was_used(store):
    run = store.start_run("m1", detector={"arch": "mirage"}, preprocess={"size": 32},
                          threshold=0.4, decoder="pil", paths=["/data", NONUTF8])
    store.finish_run(run, {"scored": 3})
    (rec,) = store.runs()
    assert rec["model"] == "m1" and rec["detector"] == {"arch": "mirage"}
    assert rec["preprocess"] == {"size": 32} and rec["threshold"] == 0.4 and rec["decoder"] == "pil"
    assert rec["version"] and rec["started"] <= rec["finished"] and rec["summary"] == {"scored": 3}
    assert rec["paths"] == ["/data", "/data/caf\\xe9.jpg"]


def _expected(store, model=None):
    return [{**{k: getattr(r, k) for k in COLUMNS}, "id": display_id(encode_id(r.id))}
            for r in store.rows(model)]


def test_export_jsonl(store, tmp_path):
    store.write(_rows() + _rows("m2")[:2])
    assert store.export(tmp_path / "all.jsonl") == 8
    lines = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == _expected(store)
    assert store.export(tmp_path / "m2.ndjson", model="m2") == 2
    got = [json.loads(line) for line in (tmp_path / "m2.ndjson").read_text().splitlines()]
    assert got == _expected(store, "m2")


def test_export_csv(store, tmp_path):
    store.write(_rows())
    store.export(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    conv = {"size": int, "score": float, "label": int, "time": float}
    parsed = [{k: (None if v == "" else conv.get(k, str)(v)) for k, v in rec.items()} for rec in got]
    assert parsed == _expected(store)  # floats round-trip exactly (repr)


def test_export_parquet(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    store.write(_rows())
    store.export(tmp_path / "r.parquet")
    got = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert got == _expected(store)
    empty = tmp_path / "none.parquet"
    with ResultStore(tmp_path / "empty.sqlite") as other:
        assert other.export(empty) == 0
    assert pq.read_table(empty).num_rows == 0 and "score" in pq.read_table(empty).column_names


def test_export_errors(store, tmp_path, monkeypatch):
    store.write(_rows())
    with pytest.raises(ValueError, match="export format"):
        store.export(tmp_path / "r.xlsx")
    with pytest.raises(ValueError, match="no results for model"):
        store.export(tmp_path / "r.csv", model="nope")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(ImportError, match="pip install pyarrow"):
        store.export(tmp_path / "r.parquet")
    assert not (tmp_path / "r.parquet").exists()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResultStore(tmp_path / "no" / "such" / "r.sqlite")


def test_done_in_archive_is_exactly_its_members(store):
    tar, odd = "/x/shard.tar", os.fsdecode(b"/x/caf\xe9.tar")
    ids = [f"{tar}::a.jpg", os.fsdecode(f"{tar}::b/".encode() + b"\xe9.jpg"), f"{tar}x::c.jpg",
           f"{tar}:d.jpg", tar, f"{odd}::e.jpg", f"{tar}::bad.jpg"]
    store.write([ResultRow(i, "m", None, None, None if "bad" in i else 0.5, None,
                           "cannot decode" if "bad" in i else None, 1.0) for i in ids])
    assert sorted(store.done_in_archive("m", tar)) == sorted([ids[0], ids[1], ids[6]])
    assert sorted(store.done_in_archive("m", tar, include_errors=False)) == sorted(ids[:2])
    assert store.done_in_archive("m", odd) == [ids[5]] and store.done_in_archive("other", tar) == []
