"""UniGenDet's training data: public-format readers, weighted interleave, token packing, rank
sharding, resume, bad-sample accounting, and the runner end to end on the tiny model."""
import io
import json
import os
from itertools import islice

import pytest
import torch
from PIL import Image

from aigid.data.transforms import eval_transform
from aigid.data.unigendet_sources import FakeClueSource, ParquetSource, T2IJsonSource, TarShardSource, open_source
from aigid.data.unigendet_stream import TokenCounter, UniGenDetStream
from fakeclue_samples import QUESTION, fakeclue_row, noise_png, write_tar

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny model's preprocess (aigid/models/configs/unigendet-tiny.json): BAGEL resize, 32..64 px
PP = {"size": 32, "max_size": 64, "stride": 16, "resize_mode": "bagel", "interpolation": "bicubic",
      "mean": [0.5] * 3, "std": [0.5] * 3}
TINY_TOKENS = TokenCounter(vae_stride=16, vit_resize=(64, 16, 8), vit_patch=8)


@pytest.fixture
def data(tmp_path):
    """8 detection images (JSON: 0-3, JSONL: 4-7), a tar shard and a parquet file of 6 each."""
    img = tmp_path / "images"
    img.mkdir()
    for i in range(8):
        (img / f"d{i}.png").write_bytes(noise_png(32, 32, i))
    (tmp_path / "det.json").write_text(json.dumps([fakeclue_row(f"d{i}.png", i % 2) for i in range(4)]))
    (tmp_path / "det.jsonl").write_text("\n".join(json.dumps(fakeclue_row(f"d{i}.png", i % 2)) for i in range(4, 8)))
    members = []
    for i in range(6):
        members.append((f"part/s{i:03d}.png", noise_png(32, 32, 100 + i)))
        members.append((f"part/s{i:03d}.txt", f"caption {i}".encode()))
    write_tar(tmp_path / "gen.tar", members)
    return tmp_path


def _stream(det, gen, **kw):
    kw.setdefault("max_tokens", 10_000)
    return UniGenDetStream(det, gen, transform=eval_transform(PP), tokens=TINY_TOKENS, **kw)


def _refs(pack):
    return [s.ref for s in pack.det + pack.gen]


# ---- readers ---------------------------------------------------------------------------------
def test_fakeclue_json_and_jsonl_give_aigid_labels_question_and_answer(data):
    """Catches: keeping upstream's label (1 = real) instead of aigid's (1 = fake); the question
    keeping the <image> marker; JSONL or images resolved against the wrong root."""
    src = FakeClueSource([str(data / "det.json"), str(data / "det.jsonl")], image_root=str(data / "images"))
    assert len(src.units) == 8 and src.files[1].endswith(".jsonl")
    for unit in src.units:
        rec = src.read(unit)
        i = int(os.path.basename(rec.image)[1])
        assert os.path.isfile(rec.image)
        # upstream row label i % 2: 1 = real → aigid 0; 0 = fake → aigid 1
        assert rec.label == 1 - i % 2
        assert ("fake" in rec.explanation) == (rec.label == 1)
        assert rec.question == QUESTION


def test_generation_readers_tar_parquet_and_t2i_json(tmp_path):
    """Catches: tar members paired across keys (a dot in the folder name, key.json captions),
    BAGEL's parquet ``captions`` JSON dict not unpacked, rows shifted across row groups."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    write_tar(tmp_path / "a.tar", [("x.v1/k0.jpg", noise_png(32, 32, 0)), ("x.v1/k0.txt", b"zero"),
                              ("x.v1/k1.png", noise_png(48, 32, 1)), ("x.v1/k1.json", b'{"caption": "one"}'),
                              ("x.v1/k2.png", noise_png(32, 32, 2))])          # no caption: left out
    tar = TarShardSource(str(tmp_path / "a.tar"))
    got = {tar.read(u).caption: Image.open(io.BytesIO(tar.read(u).image)).size for u in tar.units}
    assert got == {"zero": (32, 32), "one": (48, 32)} and tar.index_counts["no_caption"] == 1
    tar.close()

    images = [noise_png(32, 32 + 16 * (i % 2), i) for i in range(5)]
    caps = [json.dumps({"short": f"cap {i}"}) for i in range(5)]
    pq.write_table(pa.table({"image": images, "captions": caps}), tmp_path / "g.parquet", row_group_size=2)
    par = ParquetSource(str(tmp_path))                                      # a folder of parquet files
    assert [par.read(u).caption for u in par.units] == [f"cap {i}" for i in range(5)]
    assert par.read((0, 3)).image == images[3]

    (tmp_path / "meta.json").write_text(json.dumps([{"image_path": "p.png", "prompt": "a cat"}]))
    t2i = open_source({"path": str(tmp_path / "meta.json"), "image_root": "/imgs"}, "gen")
    assert isinstance(t2i, T2IJsonSource) and t2i.read((0, 0)).image == "/imgs/p.png"


# ---- mixing and packing ----------------------------------------------------------------------
def test_weighted_interleave_follows_det_gen_weights(data):
    """Catches: the det/gen weights swapped or ignored (upstream draws FakeClue 5 : t2i 1), and
    mix='paired' packs with unequal counts (gduf_losses rejects them)."""
    det = FakeClueSource(str(data / "det.json"), image_root=str(data / "images"))
    gen = TarShardSource(str(data / "gen.tar"))
    counts = {"det": 0, "gen": 0}
    for pack in islice(_stream(det, gen, max_tokens=100_000, det_weight=5, gen_weight=1), 2):
        counts["det"] += len(pack.det)
        counts["gen"] += len(pack.gen)
    assert sum(counts.values()) > 500
    assert 4.0 < counts["det"] / counts["gen"] < 6.5, counts
    for pack in islice(_stream(det, gen, max_tokens=2_000, mix="paired"), 5):
        assert len(pack.det) == len(pack.gen) >= 1


def test_packs_respect_the_token_budget_and_one_latent_grid(tmp_path, data):
    """Catches: a pack running past max_tokens, generation samples of two sizes in one pack (the
    trainer needs one latent grid), a wrong token estimate, and over-long samples not skipped."""
    assert TokenCounter(count_text=lambda s: 0).vae(512, 512) == 32 * 32 + 2        # BAGEL-7B grids
    assert TokenCounter(count_text=lambda s: 0).vit(512, 512) == 37 * 37 + 2        # 512 → 518 px
    members = []
    for i in range(8):
        members.append((f"s{i}.png", noise_png(32 + 16 * (i % 2), 32, i)))          # 32×32 and 48×32
        members.append((f"s{i}.txt", b"x" * (400 if i == 5 else 5)))
    write_tar(tmp_path / "sizes.tar", members)
    det = FakeClueSource(str(data / "det.json"), image_root=str(data / "images"))
    gen = TarShardSource(str(tmp_path / "sizes.tar"))
    budget = 300
    stream = _stream(det, gen, max_tokens=budget, det_weight=1, gen_weight=1)
    for pack in islice(stream, 12):
        expect = sum(TINY_TOKENS.detection(*s.pixels.shape[-2:], s.question, s.explanation) for s in pack.det) \
            + sum(TINY_TOKENS.generation(*s.pixels.shape[-2:], s.prompt) for s in pack.gen)
        assert pack.tokens == expect <= budget
        assert len({tuple(s.pixels.shape) for s in pack.gen}) <= 1
        assert all(len(s.prompt) < 400 for s in pack.gen)
    assert stream.counters["gen"]["too_long"] >= 1


# ---- sharding and resume ---------------------------------------------------------------------
def _epoch0(stream, kind):
    seen = []
    for pack in stream:
        for s in (pack.det if kind == "det" else pack.gen):
            if s.ref[1] > 0:
                return seen
            seen.append(s.ref[2:])


def test_two_ranks_get_disjoint_shares_covering_everything(data):
    """Catches: ranks reading the same rows (rank ignored), or rows lost to rounding (upstream
    drops the remainder)."""
    det = FakeClueSource([str(data / "det.json"), str(data / "det.jsonl")], image_root=str(data / "images"))
    gen = TarShardSource(str(data / "gen.tar"))
    for kind, src in (("det", det), ("gen", gen)):
        shares = []
        for rank in (0, 1):
            one = _stream(det if kind == "det" else None, gen if kind == "gen" else None,
                          rank=rank, world_size=2, max_tokens=10_000)
            shares.append(_epoch0(one, kind))
        a, b = set(shares[0]), set(shares[1])
        assert len(a) == len(shares[0]) and len(b) == len(shares[1])     # each row once per epoch
        assert not a & b and a | b == set(src.units), kind


def test_resume_from_a_saved_state_gives_the_same_next_packs(tmp_path, data):
    """Catches: the mixing RNG, per-source offsets/epochs or the carried (deferred) samples not
    saved or not restored, so a resumed run sees other data than an uninterrupted one."""
    members = []
    for i in range(7):
        members += [(f"s{i}.png", noise_png(32 + 16 * (i % 3 == 0), 32, i)), (f"s{i}.txt", b"cap")]
    write_tar(tmp_path / "mixed.tar", members)

    def fresh():
        det = FakeClueSource(str(data / "det.json"), image_root=str(data / "images"))
        return _stream(det, TarShardSource(str(tmp_path / "mixed.tar")), max_tokens=250, seed=3)

    a = fresh()
    it = iter(a)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))                      # survives JSON
    assert state["carry"], "the scenario should leave a deferred sample to carry over"
    expected = [next(it) for _ in range(8)]
    b = fresh()
    b.load_state_dict(state)
    got = list(islice(b, 8))
    assert [_refs(p) for p in got] == [_refs(p) for p in expected]
    for p, q in zip(got, expected):
        assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(p.det + p.gen, q.det + q.gen))
    assert b.state_dict()["counters"] == a.state_dict()["counters"]
    with pytest.raises(ValueError, match="rank"):
        c = _stream(FakeClueSource(str(data / "det.json"), image_root=str(data / "images")),
                    TarShardSource(str(tmp_path / "mixed.tar")), max_tokens=250, seed=3, rank=1, world_size=2)
        c.load_state_dict(state)


def test_bad_samples_are_skipped_and_counted(tmp_path, data):
    """Catches: a missing or corrupt image, an empty answer/caption or a bad JSON line crashing
    the run or reaching the model, or skipped samples going uncounted."""
    (data / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [json.dumps(fakeclue_row("d0.png", 0)), "{not json", json.dumps(fakeclue_row("gone.png", 1)),
             json.dumps(fakeclue_row("broken.png", 0)), json.dumps(fakeclue_row("d1.png", 1, answer="  ")),
             json.dumps({**fakeclue_row("d2.png", 1), "label": "real"}), json.dumps(fakeclue_row("d3.png", 1))]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    write_tar(tmp_path / "bad.tar", [("a.png", noise_png(32, 32, 0)), ("a.txt", b"fine"),
                                ("b.png", noise_png(32, 32, 1)), ("b.txt", b"   "),
                                ("c.png", b"garbage"), ("c.txt", b"corrupt")])
    det = FakeClueSource(str(tmp_path / "bad.jsonl"), image_root=str(data / "images"))
    gen = TarShardSource(str(tmp_path / "bad.tar"))
    stream = _stream(det, gen, max_tokens=1_000, det_weight=1, gen_weight=1)
    seen = set()
    for pack in islice(stream, 6):
        seen |= {os.path.basename(det.read(s.ref[2:]).image) for s in pack.det}
        assert {s.prompt for s in pack.gen} <= {"fine"}
    assert seen == {"d0.png", "d3.png"}
    c = stream.counters
    assert (c["det"]["bad_json"], c["det"]["empty_answer"], c["det"]["bad_label"]) == (1, 1, 1)
    assert c["det"]["missing_image"] >= 1 and c["det"]["corrupt_image"] >= 1
    assert c["gen"]["empty_caption"] >= 1 and c["gen"]["corrupt_image"] >= 1


# ---- the runner ------------------------------------------------------------------------------
def test_runner_trains_tiny_gduf_then_diga_and_writes_logs_summary_and_model(tmp_path, data):
    """Catches: the stream's packs not matching what train_gduf/train_diga take, logs or summary
    missing steps or counts, and a saved folder that does not load with the trained weights."""
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig
    from aigid.training.unigendet.run import run_unigendet_training

    (data / "data.json").write_text(json.dumps({
        "detection": {"path": ["det.json", "det.jsonl"], "image_root": "images"},
        "generation": {"path": "gen.tar"}, "det_weight": 5, "gen_weight": 1, "max_tokens": 400}))
    out = tmp_path / "gduf"
    summary = run_unigendet_training({"stage": "gduf", "data": str(data / "data.json"), "out": str(out),
                                      "model": "tiny", "steps": 3, "progress": False,
                                      "train": {"warmup_steps": 0, "lr": 1e-3}})
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert {"loss", "det", "exp", "fm", "lr"} <= set(r) and 0 < r["tokens"] <= 400
        assert r["det_samples"] >= 1 and r["gen_samples"] >= 1 and r["skipped"] == {"det": 0, "gen": 0}
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["steps"] == 3 and saved["tokens"] == sum(r["tokens"] for r in lines)
    assert saved["weights"] == "ema" and saved["train"]["det_weight"] == 5
    assert json.loads((out / "data_state.json").read_text())["packs"] == 3
    assert summary["samples"]["det"] == sum(r["det_samples"] for r in lines)

    loaded = UniGenDet.from_pretrained(str(out)).state_dict()
    trained = summary["model"].state_dict()
    start = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)
    assert not torch.equal(loaded["fake_cls_head.0.weight"], start["fake_cls_head.0.weight"])  # it trained

    out2 = tmp_path / "diga"
    summary = run_unigendet_training({"stage": "diga", "data": str(data / "data.json"), "out": str(out2),
                                      "model": str(out), "steps": 2, "progress": False,
                                      "train": {"warmup_steps": 0}})
    assert summary["samples"]["det"] == 0 and summary["samples"]["gen"] >= 2
    assert len((out2 / "train_log.jsonl").read_text().splitlines()) == 2
    UniGenDet.from_pretrained(str(out2))
