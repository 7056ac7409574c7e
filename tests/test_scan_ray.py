"""``scan_ray`` on a local Ray (3 CPUs): stages, spread over actors, equality with ``aigid.scan``,
resume after a kill, the Parquet folder, the detector fingerprint from files, and the summary's
``skipped_not_image`` / ``declared_*`` counts and ``sniff`` matching the local scanner's."""
import io
import json
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import aigid
from adversarial_corpus import build_corpus
from test_provenance import DST, _jpeg, _text_png, _xmp
from aigid.scanning.fingerprint import detector_layout, identity_of_folder, model_id_of_folder
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.scanning.local import model_id, scan_to_store
from aigid.scanning.store import ResultStore


@pytest.fixture(scope="module")
def det_dir(tiny_mirage_folder):
    """conftest's saved tiny MiraGe, under the name these tests use."""
    return tiny_mirage_folder


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


AI_XMP = _xmp(DST + "trainedAlgorithmicMedia")
CAMERA_XMP = _xmp(DST + "digitalCapture")


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _declared_corpus(root) -> None:
    """Images declaring AI (an A1111 ``parameters`` PNG, an IPTC XMP JPEG) or a capture, plain
    ones, a cut-short PNG (an error: never counted), a declared-AI JPEG named ``.dat``, a text
    file; and a tar holding the same kinds as members (a plain JPEG named ``.dat``, JSON)."""
    root.mkdir(parents=True)
    (root / "a1111.png").write_bytes(_text_png(("parameters", "cat\nSteps: 20, Sampler: Euler")))
    (root / "xmp_ai.jpg").write_bytes(_jpeg(1, xmp=AI_XMP))
    (root / "camera.jpg").write_bytes(_jpeg(2, xmp=CAMERA_XMP))
    (root / "plain.png").write_bytes(_png(3))
    (root / "broken.png").write_bytes(_text_png(("parameters", "Steps: 1"))[:60])
    (root / "photo.dat").write_bytes(_jpeg(5, xmp=AI_XMP))
    (root / "notes.txt").write_text("a caption, not a list: met while walking\n")
    _tar(root / "shard.tar", {"ai.jpg": _jpeg(6, xmp=AI_XMP), "cam.jpg": _jpeg(7, xmp=CAMERA_XMP),
                              "blob.dat": _jpeg(8), "meta.json": b'{"caption": "x"}'})


COUNTED = ("scored", "errors", "skipped", "skipped_not_image", "declared_ai",
           "declared_ai_missed", "declared_camera")


def _counted(summary: dict) -> dict:
    return {k: summary[k] for k in COUNTED if k in summary}


# --------------------------------------------------------------------------- without Ray


def test_folder_fingerprint_equals_model_id(det_dir, tmp_path):
    """Catches a files-only fingerprint that drifts from ``aigid.scanning.local.model_id`` (a config key
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
    from aigid.scanning.ray_stages import DoneSet, done_keys, expand, id_bytes, walk

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
    from aigid.scanning.ray_stages import DoneSet, done_keys

    rng = np.random.default_rng(0)
    ids = [bytes(rng.integers(0, 256, 24, dtype=np.uint8)) for _ in range(3000)]
    done = DoneSet()
    done._keys = done_keys(iter(ids[:2000]))
    assert all(i in done for i in ids[:2000]) and not any(i in done for i in ids[2000:])
    assert b"anything" not in DoneSet()  # nothing stored: nothing done


def t_schema():
    from aigid.scanning.ray_stages import SLICE
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

        from aigid.scanning.ray_stages import SCORED

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
    from aigid.scanning.ray import scan_ray

    total = _shards(tmp_path / "data")
    summary = scan_ray([tmp_path / "data"], str(det_dir), out=tmp_path / "ray.sqlite",
                       batch_size=4, items_per_task=2, min_actors=3, max_actors=3,
                       gpus_per_actor=0, cpus_per_actor=0, progress=False, _scorer=StandIn)
    assert summary["complete"] and summary["scored"] + summary["errors"] == total
    items = [a["items"] for a in summary["actors"].values()]
    assert len(items) == 3 and sum(items) == total
    # every actor scores, none takes most of it (a loaded machine starts actors late, so not
    # an even third: one took 32 of 60 once under a parallel test run)
    assert min(items) > 0 and max(items) <= 2 * total / 3, summary["actors"]
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
    import aigid.scanning.ray as sr
    from aigid.scanning.ray import scan_ray

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
    that scores again what its files already hold; the rerun, without evidence, reports no
    ``declared_*`` keys (as ``aigid.scan``): catches a Parquet path that always counts."""
    import pyarrow.parquet as pq

    from aigid.scanning.ray import scan_ray

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
    assert (first["declared_ai"], first["declared_camera"]) == (0, 0)
    again = scan_ray([tmp_path / "data"], str(det_dir), out=out, _scorer=StandIn, evidence=False, **kw)
    assert (again["skipped"], again["scored"], again["errors"]) == (total + 1, 0, 0)
    assert not any(k.startswith("declared") for k in again)
    assert pq.read_table(out).num_rows == total + 1


def test_cli_scan_ray_writes_the_same_store(local_ray, det_dir, tmp_path, capsys):
    """Catches `aigid scan --ray` not reaching scan_ray (a local scan instead: no actors in the
    summary), losing rows on the way to the driver's store, `--sniff` dropped on the way to
    scan_ray (the PNG named .dat would be skipped as not an image, as it was before), and, with
    `--no-evidence`, ``declared_*`` reported as zeros for what was never read (``aigid.scan``
    leaves them out)."""
    from aigid.cli import main

    total = _shards(tmp_path / "data", n_shards=2, per_shard=2, loose=2)
    (tmp_path / "data" / "loose" / "x.dat").write_bytes(_png(7))
    (tmp_path / "data" / "loose" / "x.txt").write_text("caption")
    db = tmp_path / "r.sqlite"
    assert main(["scan", str(tmp_path / "data"), "--detector", str(det_dir), "--ray", "local", "--out",
                 str(db), "--batch-size", "4", "--items-per-task", "4", "--actors", "1", "--quiet",
                 "--sniff", "--no-evidence"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == total + 1 and summary.get("actors")
    assert summary["skipped_not_image"] == {".txt": 1}
    assert not any(k.startswith("declared") for k in summary)
    assert len(_rows(db)) == total + 1 and str(tmp_path / "data" / "loose" / "x.dat") in _rows(db)


def test_summary_counts_match_the_local_scan_in_both_outputs(local_ray, det_dir, tmp_path):
    """The Ray summary's ``skipped_not_image`` and ``declared_*`` equal ``aigid.scan``'s on one
    corpus (loose files and tar members), into SQLite without ``sniff`` and into a Parquet folder
    with it, and on a resumed run (a new file added). Catches: non-images not counted, or counted
    where the other filter runs (walk vs expand vs decode), or twice; ``sniff`` not reaching the
    walk/expand filter (the .dat JPEGs never scored) or not judged by content (the text files
    scored as errors), or reported twice by a task that flushes its tally more than once;
    declared counts taken over error rows, labelled with the default threshold
    instead of the run's, or missed read as labelled fake; on resume, the Parquet read-back
    counting every run's rows instead of this run's (local: declared_* are this run's only)."""
    import pyarrow.parquet as pq

    from aigid.provenance import provenance_of
    from aigid.scanning.ray import scan_ray

    data = tmp_path / "data"
    _declared_corpus(data)
    detector = aigid.load_detector(str(det_dir))
    local = dict(batch_size=4, num_workers=0, progress=False)
    kw = dict(batch_size=4, items_per_task=3, max_actors=1, gpus_per_actor=0, cpus_per_actor=0,
              progress=False)
    # A threshold between the declared-AI images' scores: some labelled fake, some missed.
    ai = sorted(r.score for r in aigid.scan([data], detector, sniff=True, **local)
                if r.score is not None and provenance_of(r.evidence) == "declared-ai")
    assert len(ai) == 3 + 1 and ai[2] - ai[1] > 1e-3  # far from Ray's scores' float noise
    threshold = (ai[1] + ai[2]) / 2

    # SQLite, without sniff: .dat/.json/.txt left out by name, in the walk and in the tar.
    ref = scan_to_store([data], detector, out=tmp_path / "ref.sqlite", threshold=threshold, **local)
    assert ref["skipped_not_image"] == {".dat": 2, ".json": 1, ".txt": 1}
    assert (ref["declared_ai"], ref["declared_camera"]) == (3, 2)
    got = scan_ray([data], str(det_dir), out=tmp_path / "ray.sqlite", threshold=threshold, **kw)
    assert _counted(got) == _counted(ref)

    # A Parquet folder, with sniff: the two JPEGs named .dat are scored (one declares AI).
    # Slices longer than a batch: a decode task reports to the tally more than once.
    kw.update(batch_size=2, items_per_task=8)
    out = tmp_path / "parquet"
    out.mkdir()
    ref = scan_to_store([data], detector, out=tmp_path / "ref_sniff.sqlite", threshold=threshold,
                        sniff=True, **local)
    assert ref["skipped_not_image"] == {".json": 1, ".txt": 1}
    assert (ref["declared_ai"], ref["declared_camera"]) == (4, 2)
    assert 0 < ref["declared_ai_missed"] < 4
    got = scan_ray([data], str(det_dir), out=out, threshold=threshold, sniff=True, **kw)
    assert _counted(got) == _counted(ref)
    ids = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    for name in (str(data / "photo.dat"), f"{data / 'shard.tar'}::blob.dat"):
        assert ids[name]["score"] is not None and ids[name]["error"] is None

    # Resumed, with one new declared-AI image: only it is scored and counted, as locally.
    (data / "new_ai.png").write_bytes(_text_png(("parameters", "dog\nSteps: 9, Sampler: Euler")))
    ref = scan_to_store([data], detector, out=tmp_path / "ref_sniff.sqlite", threshold=threshold,
                        sniff=True, **local)
    assert (ref["scored"], ref["declared_ai"], ref["declared_camera"]) == (1, 1, 0)
    got = scan_ray([data], str(det_dir), out=out, threshold=threshold, sniff=True, **kw)
    assert _counted(got) == _counted(ref)
