"""``scan_ray`` on a local Ray (3 CPUs): stages, spread over actors, equality with ``aigid.scan``,
resume after a kill, the Parquet folder, and the detector fingerprint from files."""
import io
import json
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import aigid
from adversarial_corpus import build_corpus
from aigid.fingerprint import detector_layout, identity_of_folder, model_id_of_folder
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.scan import model_id, scan_to_store
from aigid.store import ResultStore


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("det")
    MiraGe(MiraGeConfig.named("tiny"), seed=0).save_pretrained(out)
    return out


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shards(root, n_shards: int = 12, per_shard: int = 4, loose: int = 12) -> int:
    """``n_shards`` tars of ``per_shard`` PNGs beside a folder of ``loose`` PNGs; the item count."""
    (root / "loose").mkdir(parents=True)
    for i in range(loose):
        (root / "loose" / f"{i:03d}.png").write_bytes(_png(1000 + i))
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for j in range(per_shard):
                data = _png(s * 100 + j)
                info = tarfile.TarInfo(f"{j:03d}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return n_shards * per_shard + loose


def _same_rows(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for ident, r in ref.items():
        g = got[ident]
        assert (g.hash, g.size, g.error, g.model, g.evidence) == \
            (r.hash, r.size, r.error, r.model, r.evidence), ident
        assert (g.score is None) == (r.score is None), ident
        if r.score is not None:
            assert g.score == pytest.approx(r.score, abs=1e-5), ident


def _rows(db) -> dict:
    with ResultStore(db) as store:
        return {r.id: r for r in store.rows()}


# --------------------------------------------------------------------------- without Ray


def test_folder_fingerprint_equals_model_id(det_dir, tmp_path):
    """Catches a files-only fingerprint that drifts from ``aigid.scan.model_id`` (a config key
    dropped, the backbone's ``clip.`` prefix lost, tensors in another order): local and Ray scans
    of one store would then resume under two ids and score everything twice."""
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig

    mirage = aigid.load_detector(str(det_dir))
    found = identity_of_folder(det_dir)
    assert found.model == model_id(mirage) == model_id_of_folder(det_dir)
    assert found.layout == detector_layout(mirage)
    assert found.preprocess == mirage.config.preprocess
    UniGenDet(UniGenDetConfig.named("tiny")).save_pretrained(tmp_path / "u")
    assert model_id_of_folder(tmp_path / "u") == model_id(aigid.load_detector(str(tmp_path / "u")))
    # Other weights, other id; a folder that does not hold the backbone cannot be fingerprinted.
    other = MiraGe(MiraGeConfig.named("tiny"), seed=1)
    other.save_pretrained(tmp_path / "m1")
    assert model_id_of_folder(tmp_path / "m1") not in (None, found.model)
    assert model_id_of_folder(tmp_path / "missing") is None


def test_archives_are_cut_into_even_slices_and_done_ids_left_out(tmp_path):
    """Catches an archive handed whole to one task (the issue's twelve shards on one actor), a
    compressed tar cut into slices that would each decompress it again, and resume that reads
    done members anyway."""
    from aigid.scan_ray_stages import DoneSet, done_keys, expand, id_bytes, walk

    _shards(tmp_path, n_shards=1, per_shard=10, loose=5)
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tf:
        for j in range(6):
            data = _png(j)
            info = tarfile.TarInfo(f"{j}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    import pyarrow as pa

    done = DoneSet()
    paths = pa.table({"path": [id_bytes(str(tmp_path))]})
    units = pa.concat_tables(walk(paths, items_per_task=4, done=done, tally=None)).to_pylist()
    assert sorted((u["kind"], len(u["ids"])) for u in units) == [
        ("archive", 0), ("archive", 0), ("files", 1), ("files", 4)]
    slices = [s for u in units for t in expand(pa.Table.from_pylist([u], schema=t_schema()),
                                               items_per_task=4, done=done, tally=None)
              for s in t.to_pylist()]
    assert sorted((s["kind"], len(s["ids"])) for s in slices) == [
        ("files", 1), ("files", 4), ("members", 2), ("members", 4), ("members", 4), ("members", 6)]
    # Resume: done ids (a loose file, two members) are never listed again.
    tar = str(tmp_path / "shard-000.tar")
    loose = [u for u in units if u["kind"] == "files"][0]["ids"][0]
    gone = [loose, id_bytes(f"{tar}::000.png"), id_bytes(f"{tar}::005.png")]
    done._keys = done_keys(iter(gone))
    units = pa.concat_tables(walk(paths, items_per_task=4, done=done, tally=None)).to_pylist()
    archive = [u for u in units if u["source"] == id_bytes(tar)]
    members = [i for t in expand(pa.Table.from_pylist(archive, schema=t_schema()),
                                 items_per_task=4, done=done, tally=None)
               for s in t.to_pylist() for i in s["ids"]]
    assert sum(len(u["ids"]) for u in units if u["kind"] == "files") == 4
    assert len(members) == 8 and not set(gone) & set(members)


def test_done_set_is_exact():
    """Catches a done set that misses stored ids (numpy's bytes scalars drop a key's trailing
    NUL bytes: one key in 256 would never match, so resume rescored it) or matches new ones."""
    from aigid.scan_ray_stages import DoneSet, done_keys

    rng = np.random.default_rng(0)
    ids = [bytes(rng.integers(0, 256, 24, dtype=np.uint8)) for _ in range(3000)]
    done = DoneSet()
    done._keys = done_keys(iter(ids[:2000]))
    assert all(i in done for i in ids[:2000]) and not any(i in done for i in ids[2000:])
    assert b"anything" not in DoneSet()  # nothing stored: nothing done


def t_schema():
    from aigid.scan_ray_stages import SLICE
    return SLICE


# --------------------------------------------------------------------------- on a local Ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="scan_ray needs the [dist] extra (ray[data])")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # StandIn, DiesAfterTwo
    yield ray
    ray.shutdown()


class StandIn:
    """A scoring actor without a model: a fixed latency per batch, as a busy GPU has, so the
    actors are the bottleneck and where work goes shows the pool's spread."""
    latency = 1.0

    def __init__(self, detector, layout, preprocess):
        import ray
        self.actor = ray.get_runtime_context().get_actor_id()

    def __call__(self, batch):
        import pyarrow as pa

        from aigid.scan_ray_stages import SCORED

        started = time.perf_counter()
        time.sleep(self.latency)
        n = batch.num_rows
        busy = (time.perf_counter() - started) / max(1, n)
        return pa.table({"id": batch["id"], "hash": batch["hash"], "size": batch["size"],
                         "score": pa.nulls(n, pa.float64()), "error": batch["error"],
                         "evidence": batch["evidence"],
                         "actor": [self.actor] * n, "busy_s": [busy] * n}, schema=SCORED)


def test_shards_and_a_folder_spread_over_three_actors(local_ray, det_dir, tmp_path):
    """Catches work that does not spread (the issue: every shard in one block, so one actor
    scored all twelve) and a decode stage fused back into the scoring actors (decoding would
    then hold the GPU's actor and CPU-only nodes could not help)."""
    from aigid.scan_ray import scan_ray

    total = _shards(tmp_path / "data")
    summary = scan_ray([tmp_path / "data"], str(det_dir), out=tmp_path / "ray.sqlite",
                       batch_size=4, items_per_task=2, min_actors=3, max_actors=3,
                       gpus_per_actor=0, cpus_per_actor=0, progress=False, _scorer=StandIn)
    assert summary["complete"] and summary["scored"] + summary["errors"] == total
    items = [a["items"] for a in summary["actors"].values()]
    assert len(items) == 3 and sum(items) == total
    assert max(items) <= total / 2, summary["actors"]
    ops = summary["operators"]
    decode = [o for o in ops if "decode" in o]
    scorer = [o for o in ops if "StandIn" in o]
    assert len(decode) == 1 and len(scorer) == 1 and "decode" not in scorer[0]
    assert not any(("walk" in o or "expand" in o) and "decode" in o for o in ops)


def test_killed_scan_resumes_with_what_was_stored(local_ray, det_dir, tmp_path, monkeypatch):
    """Catches a restart that scores stored items again (or skips unstored ones): the driver dies
    after two committed blocks; the rerun must skip exactly the stored rows and end with the
    single-machine scan's table item for item (ids, hashes, sizes, errors, scores) over shards,
    loose files and the adversarial corpus (broken archives, links, non-UTF-8 names)."""
    import aigid.scan_ray as sr
    from aigid.scan_ray import scan_ray

    total = _shards(tmp_path / "data", n_shards=4, per_shard=5, loose=6)
    total += len(build_corpus(tmp_path / "data" / "corpus"))  # broken archives, links, ...
    db = tmp_path / "ray.sqlite"

    class Killed(RuntimeError):
        pass

    class DiesAfterTwo(ResultStore):
        writes = 0

        def write(self, rows):
            if DiesAfterTwo.writes == 2:
                raise Killed("simulated kill")
            DiesAfterTwo.writes += 1
            return super().write(rows)

    monkeypatch.setattr(sr, "ResultStore", DiesAfterTwo)
    # CPU actors even where Ray sees a GPU: the reference scan runs in float32 on the CPU.
    kw = dict(batch_size=4, items_per_task=3, max_actors=1, gpus_per_actor=0, cpus_per_actor=0,
              progress=False)
    with pytest.raises(Killed):
        scan_ray([tmp_path / "data"], str(det_dir), out=db, **kw)
    monkeypatch.undo()
    stored = len(_rows(db))
    assert 0 < stored < total

    summary = scan_ray([tmp_path / "data"], str(det_dir), out=db, **kw)
    assert summary["skipped"] == stored
    assert summary["scored"] + summary["errors"] == total - stored
    with ResultStore(db) as store:
        runs = store.runs()
    assert [r["summary"]["complete"] for r in runs] == [False, True]
    scan_to_store([tmp_path / "data"], aigid.load_detector(str(det_dir)),
                  out=tmp_path / "ref.sqlite", num_workers=0, progress=False)
    _same_rows(_rows(db), _rows(tmp_path / "ref.sqlite"))


def test_parquet_folder_written_by_the_cluster_and_resumed(local_ray, det_dir, tmp_path):
    """Catches Parquet output that loses or duplicates rows, and a rerun into the same folder
    that scores again what its files already hold."""
    import pyarrow.parquet as pq

    from aigid.scan_ray import scan_ray

    total = _shards(tmp_path / "data", n_shards=2, per_shard=3, loose=3)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "results"
    out.mkdir()
    kw = dict(batch_size=4, items_per_task=4, max_actors=1, gpus_per_actor=0, cpus_per_actor=0,
              progress=False)
    first = scan_ray([tmp_path / "data"], str(det_dir), out=out, **kw)
    assert (first["scored"], first["errors"]) == (total, 1)
    table = pq.read_table(out).to_pylist()
    assert len(table) == total + 1 and len({r["id"] for r in table}) == total + 1
    ref = {r.id: r for r in aigid.scan([tmp_path / "data"], aigid.load_detector(str(det_dir)),
                                       num_workers=0, progress=False)}
    for r in table:
        assert r["model"] == first["model"] and r["error"] == ref[r["id"]].error
        assert r["evidence"] == ref[r["id"]].evidence
        if r["score"] is not None:
            assert r["score"] == pytest.approx(ref[r["id"]].score, abs=1e-5)
            assert r["label"] == ref[r["id"]].label
    again = scan_ray([tmp_path / "data"], str(det_dir), out=out, _scorer=StandIn, **kw)
    assert (again["skipped"], again["scored"], again["errors"]) == (total + 1, 0, 0)
    assert pq.read_table(out).num_rows == total + 1


def test_cli_scan_ray_writes_the_same_store(local_ray, det_dir, tmp_path, capsys):
    """Catches `aigid scan --ray` not reaching scan_ray (a local scan instead: no actors in the
    summary) or losing rows on the way to the driver's store."""
    from aigid.cli import main

    total = _shards(tmp_path / "data", n_shards=2, per_shard=2, loose=2)
    db = tmp_path / "r.sqlite"
    assert main(["scan", str(tmp_path / "data"), "--detector", str(det_dir), "--ray", "local", "--out",
                 str(db), "--batch-size", "4", "--items-per-task", "4", "--actors", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == total and summary.get("actors")
    assert len(_rows(db)) == total
