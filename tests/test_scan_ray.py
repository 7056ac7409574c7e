"""``scan_ray`` on a local CPU Ray: same table as ``aigid.scan``, resume-aware, one writer."""
import pytest
import torch

import aigid
from adversarial_corpus import build_corpus
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.scan import model_id, scan_to_store
from aigid.store import ResultStore



@pytest.fixture
def one_thread():
    """What Ray gives a 1-CPU actor (OMP_NUM_THREADS=1): here the decode threads and OpenMP's
    spinning team would otherwise fight over a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("det")
    MiraGe(MiraGeConfig.named("tiny"), seed=0).save_pretrained(out)
    return out


def test_actor_and_driver_pieces_without_ray(det_dir, tmp_path, one_thread):
    """The actor class and the driver's resume filter, called directly (fast, no Ray needed)."""
    pytest.importorskip("pyarrow")
    import pyarrow as pa

    from aigid.scan_ray import _Scorer, _units

    root = tmp_path / "corpus"
    expected = build_corpus(root)
    detector = aigid.load_detector(str(det_dir))
    model = model_id(detector)
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        rows, enum_errors, skipped = _units([root], store, model, retry_errors=False)
    assert skipped == 0 and {e[0] for e in enum_errors} <= set(expected)
    scorer = _Scorer(str(det_dir), "cpu", batch_size=4, threads=2)
    tables = list(scorer(pa.Table.from_pylist(rows)))
    assert all(t.num_rows <= 4 for t in tables)  # batches of at most batch_size images
    out = [r for t in tables for r in t.to_pylist()]
    got = {r["id"].decode("utf-8", "surrogateescape"): r for r in out}
    assert len(got) == len(out) and got.keys() | {e[0] for e in enum_errors} == set(expected)
    ref = {r.id: r for r in aigid.scan([root], detector, out=None, num_workers=0, progress=False)}
    for ident, r in got.items():
        assert (r["hash"], r["size"], r["error"]) == (ref[ident].hash, ref[ident].size, ref[ident].error)
        if r["score"] is not None:
            assert r["score"] == pytest.approx(ref[ident].score, abs=1e-5)
    # Once everything is stored, the driver sends plain files no more, and for each archive the
    # ids the actor must not read again -- members and the archive's own error alike.
    scan_to_store([root], detector, out=db, num_workers=0, progress=False)
    with ResultStore(db) as store:
        rows, enum_errors, skipped = _units([root], store, model, retry_errors=False)
    assert skipped == len(expected) and enum_errors == []
    assert rows and all(r["kind"] == "archive" for r in rows)
    assert list(scorer(pa.Table.from_pylist(rows))) == []
    with ResultStore(db) as store:  # retry_errors: the errors are sent again
        rows, _, skipped = _units([root], store, model, retry_errors=True)
    assert skipped == sum(v == "ok" for v in expected.values())


def _ray():
    ray = pytest.importorskip("ray", reason="scan_ray needs the [dist] extra (ray[data])")
    pytest.importorskip("ray.data")
    return ray


@pytest.fixture(scope="module")
def local_ray():
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_scan_ray_matches_scan_and_resumes(local_ray, det_dir, tmp_path):
    """End to end on a local 2-CPU Ray (about 15-25 s here, most of it Ray starting up)."""
    from aigid.scan_ray import scan_ray

    root = tmp_path / "corpus"
    expected = build_corpus(root)
    detector = aigid.load_detector(str(det_dir))
    model = model_id(detector)

    # Half done by the local scanner first (its first batches), the rest by Ray: resume must
    # send only what is missing and the final table must equal a plain scan's.
    ray_db, ref_db = tmp_path / "ray.sqlite", tmp_path / "ref.sqlite"
    gen = aigid.scan([root], detector, out=ray_db, batch_size=8, num_workers=0, progress=False)
    head = [next(gen) for _ in range(8)]
    gen.close()
    with ResultStore(ray_db) as store:
        already = store.count(model)
    assert already >= len(head)

    summary = scan_ray([root], str(det_dir), out=ray_db, batch_size=4, concurrency=1,
                       progress=False, export=tmp_path / "ray.csv")
    assert summary["complete"] and summary["model"] == model and summary["skipped"] == already
    assert summary["scored"] + summary["errors"] == len(expected) - already
    scan_to_store([root], detector, out=ref_db, num_workers=0, progress=False)

    with ResultStore(ray_db) as a, ResultStore(ref_db) as b:
        got, ref = {r.id: r for r in a.rows()}, {r.id: r for r in b.rows()}
    assert got.keys() == ref.keys() == set(expected)
    for ident, r in ref.items():
        g = got[ident]
        assert (g.hash, g.size, g.error, g.label, g.model) == (r.hash, r.size, r.error, r.label, r.model)
        assert (g.score is None) == (r.score is None)
        if r.score is not None:
            assert g.score == pytest.approx(r.score, abs=1e-5)
    assert (tmp_path / "ray.csv").read_text().count("\n") == len(expected) + 1
