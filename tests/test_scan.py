"""``aigid.scan`` over the adversarial corpus, the store it writes, and the ``scan``/``export`` CLI."""
import json
import os
from pathlib import Path

import pytest
import torch

import aigid
from adversarial_corpus import build_corpus, build_list_file
from aigid.cli import main
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.scanning.local import model_id, scan, scan_to_store
from aigid.scanning.store import ResultStore


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    torch.manual_seed(0)  # the tiny backbone is randomly initialised from the global generator
    out = tmp_path_factory.mktemp("det")
    MiraGe(MiraGeConfig.named("tiny"), seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def detector(detector_dir):
    return aigid.load_detector(str(detector_dir))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    return root, build_corpus(root)


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under root (links not followed) with what would show a write."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.fsdecode(p)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def test_aigid_scan_is_the_function():
    assert aigid.scan is scan and "scan" in aigid.__all__


def test_corpus_every_item_scored_or_error_and_nothing_written_elsewhere(detector, corpus, tmp_path):
    root, expected = corpus
    (tmp_path / "out").mkdir()
    db = tmp_path / "out" / "r.sqlite"
    before = _tree(tmp_path)
    results = list(scan([root], detector, out=db, batch_size=4, num_workers=0, progress=False,
                        threshold=0.3))
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)) and set(ids) == set(expected)
    for r in results:
        if expected[r.id] == "ok":
            assert r.error is None and 0.0 <= r.score <= 1.0 and r.label == int(r.score > 0.3)
            assert len(r.hash) == 32 and r.size > 0
        else:
            assert r.score is None and r.label is None and r.error and r.error.strip()
    # The store holds exactly what was yielded.
    with ResultStore(db) as store:
        rows = {row.id: row for row in store.rows()}
        (run,) = store.runs()
    assert rows.keys() == set(expected)
    for r in results:
        row = rows[r.id]
        assert (row.hash, row.size, row.score, row.label, row.error) == \
            (r.hash, r.size, r.score, r.label, r.error)
        assert row.model == model_id(detector)
    assert run["preprocess"] == detector.config.preprocess and run["threshold"] == 0.3
    assert run["summary"]["scored"] == sum(v == "ok" for v in expected.values())
    assert run["summary"]["complete"] and run["finished"] >= run["started"]
    # Nothing else changed: no extracted members ("../escape.jpg", "/abs/evil.jpg"), no temp files.
    out_dir = str(tmp_path / "out")
    outside = lambda tree: {p: v for p, v in tree.items() if not p.startswith(out_dir)}  # noqa: E731
    assert outside(_tree(tmp_path)) == outside(before)
    assert not os.path.exists("/abs/evil.jpg")
    assert {p.name for p in (tmp_path / "out").iterdir()} <= {"r.sqlite", "r.sqlite-wal", "r.sqlite-shm"}


def test_scores_match_predict_and_workers_agree(detector, corpus):
    root, expected = corpus
    serial = {r.id: r for r in scan([root], detector, out=None, batch_size=3, num_workers=0,
                                    progress=False)}
    parallel = {r.id: r for r in scan([root], detector, out=None, batch_size=5, num_workers=2,
                                      progress=False)}
    assert serial.keys() == parallel.keys() == set(expected)
    for ident, r in serial.items():
        p = parallel[ident]
        assert (r.hash, r.size, r.error) == (p.hash, p.size, p.error)
        if r.score is not None:
            assert p.score == pytest.approx(r.score, abs=1e-5)
    # Scan's decoding and preprocessing give the same score as predict() on the file itself.
    files = [str(root / "good.jpg"), str(root / "cmyk.jpg"), str(root / "exif_rot6.jpg")]
    direct = detector.predict(files)
    for f, s in zip(files, direct.tolist()):
        assert serial[f].score == pytest.approx(s, abs=1e-5)


def test_list_file_and_export(detector, corpus, tmp_path):
    root, _ = corpus
    lst, expected = build_list_file(root)
    db, out = tmp_path / "r.sqlite", tmp_path / "r.jsonl"
    stats = scan_to_store([lst], detector, out=db, export=out, batch_size=2, num_workers=0,
                          progress=False)
    assert stats["scored"] == sum(v == "ok" for v in expected.values())
    assert stats["errors"] == sum(v == "error" for v in expected.values())
    assert stats["complete"] and stats["exported"] == len(expected) and stats["skipped"] == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {rec["id"] for rec in lines} == set(expected)
    assert all((rec["error"] is None) == (expected[rec["id"]] == "ok") for rec in lines)


def test_stopping_early_keeps_only_whole_batches(detector, corpus, tmp_path):
    root, expected = corpus
    db = tmp_path / "r.sqlite"
    gen = scan([root], detector, out=db, batch_size=4, num_workers=0, progress=False)
    first = [next(gen) for _ in range(2)]
    gen.close()
    with ResultStore(db) as store:
        stored = store.done_ids(model_id(detector))
        (run,) = store.runs()
    assert {r.id for r in first} <= stored and len(stored) < len(expected)
    assert run["summary"]["complete"] is False


def test_model_id_tracks_weights_not_objects(detector, detector_dir):
    again = aigid.load_detector(str(detector_dir))
    assert model_id(again) == model_id(detector)
    with torch.no_grad():
        again.prompts.text.add_(1e-3)
    assert model_id(again) != model_id(detector)


def test_bad_arguments(detector, corpus):
    root, _ = corpus
    with pytest.raises(ValueError, match="no paths"):
        next(scan([], detector, out=None))
    with pytest.raises(ValueError, match="needs a results store"):
        next(scan([root], detector, out=None, export="x.csv"))
    with pytest.raises(ValueError, match="decoder"):
        next(scan([root], detector, out=None, decoder="magic", progress=False))
    with pytest.raises(TypeError, match="config.preprocess"):
        next(scan([root], object(), out=None))


def test_cli_scan_and_export(detector_dir, corpus, tmp_path, capsys):
    root, expected = corpus
    db = tmp_path / "r.sqlite"
    code = main(["scan", str(root), "--detector", str(detector_dir), "--out", str(db),
                 "--export", str(tmp_path / "r.csv"), "--batch-size", "8", "--workers", "0",
                 "--device", "cpu", "--decoder", "pil", "--threshold", "0.4", "--quiet"])
    assert code == 0  # errors in the data are results, not a failure
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] + summary["errors"] == len(expected) and summary["errors"] > 0
    assert (tmp_path / "r.csv").read_text().count("\n") == len(expected) + 1
    # Resumed: everything is skipped.
    assert main(["scan", str(root), "--detector", str(detector_dir), "--out", str(db),
                 "--workers", "0", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] == len(expected) and again["scored"] == again["errors"] == 0
    assert main(["export", str(db), str(tmp_path / "all.parquet"), "--model", summary["model"]]) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == len(expected)


def test_cli_usage_errors(detector_dir, corpus, tmp_path, capsys):
    root, _ = corpus
    code = main(["scan", str(root), "--detector", str(tmp_path / "nope"), "--out", str(tmp_path / "r.sqlite")])
    assert code == 2 and str(tmp_path / "nope") in capsys.readouterr().err
    assert main(["scan", str(tmp_path / "typo"), "--detector", str(detector_dir)]) == 2
    assert "typo" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.sqlite"), str(tmp_path / "x.csv")]) == 2
    assert "no such results file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # argparse's own usage errors exit 2
        main(["scan", str(root), "--detector", str(detector_dir), "--decoder", "magic"])
    assert err.value.code == 2
    assert not (tmp_path / "r.sqlite").exists()
