"""Batches for bulk scanning: CPU decode path, worker sharding, skip, DALI routing and fallback."""
from __future__ import annotations

import os
import tarfile

import pytest
import torch
from adversarial_corpus import EXIF_NAME, build_corpus, jpeg_bytes, nonutf8_supported, png_bytes
from PIL import Image

from aigid import backends
from aigid.data import decode_cpu
from aigid.data.batches import Batch, Record, choose_decoder, iter_batches
from aigid.data.decode_cpu import ScanDataset, make_loader
from aigid.data.decode_dali import DaliFailure, dali_eligible, iter_dali, jpeg_info, sniff
from aigid.data.images import load_rgb
from aigid.data.sources import content_hash
from aigid.data.transforms import eval_transform

PP = {"size": 16, "resize_mode": "shortest", "interpolation": "bicubic",
      "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode") / "corpus"
    return root, build_corpus(root)


def _collect(batches) -> tuple[dict[str, str], dict[str, torch.Tensor], dict]:
    """Outcome per id, pixels per scored id, record per id; asserts each id appears once."""
    outcome, pixels, records = {}, {}, {}
    for batch in batches:
        assert isinstance(batch, Batch) and batch.pixels.shape[0] == len(batch.records)
        for row, rec in zip(batch.pixels, batch.records):
            assert rec.id not in outcome and rec.error is None
            outcome[rec.id], pixels[rec.id], records[rec.id] = "ok", row, rec
        for rec in batch.errors:
            assert rec.id not in outcome and rec.error
            outcome[rec.id], records[rec.id] = "error", rec
    return outcome, pixels, records


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_every_item_scored_or_error_exactly_once(corpus, batch_size):
    root, expected = corpus
    outcome, pixels, records = _collect(iter_batches([root], PP, batch_size))
    assert outcome == expected
    for ident, row in pixels.items():
        assert row.shape == (3, 16, 16) and row.dtype == torch.float32 and torch.isfinite(row).all()
    assert "decompression bomb" in records[str(root / "bomb.png")].error
    assert records[f"{root}/shards/evil.tar::link.jpg"].error == "archive link member skipped"
    good = records[str(root / "good.jpg")]
    data = (root / "good.jpg").read_bytes()
    assert (good.hash, good.size) == (content_hash(data), len(data))
    # the same pixels as predict's own path (load_rgb + eval_transform)
    torch.testing.assert_close(pixels[str(root / "good.jpg")],
                               eval_transform(PP)(load_rgb(str(root / "good.jpg"))))


def test_workers_cover_the_same_ids_as_in_process(corpus, tmp_path, monkeypatch):
    root, expected = corpus
    log = tmp_path / "opens.log"
    real_open = tarfile.open

    def logging_open(name=None, *args, **kwargs):  # forked workers inherit it; a file collects
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {os.path.basename(str(name))}\n")
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", logging_open)
    one = _collect(iter_batches([root], PP, 4, num_workers=0))
    two = _collect(iter_batches([root], PP, 4, num_workers=2))
    assert one[0] == two[0] == expected
    for ident in one[1]:
        torch.testing.assert_close(one[1][ident], two[1][ident])
    lines = log.read_text().split()
    names = lines[1::2]
    tars = ["evil.tar", "pack.tar.gz", "truncated.tgz", "broken.tar"]
    assert sorted(names) == sorted(tars * 2)  # each tar opened once per run, whatever the workers
    worker_pids = {pid for pid in lines[0::2] if int(pid) != os.getpid()}
    assert len(worker_pids) == 2  # both workers did some of the archives


def test_skip_leaves_items_unread(corpus, monkeypatch):
    root, expected = corpus
    skipped = {str(root / "good.jpg"), str(root / "text.jpg"), str(root / "nested" / "loop"),
               f"{root}/shards/evil.tar::../escape.jpg", str(root / "shards" / "truncated.tgz")}
    read_paths, read_members = [], []
    real_read, real_extract = decode_cpu.read_file, tarfile.TarFile.extractfile
    monkeypatch.setattr(decode_cpu, "read_file",
                        lambda path, size=None: (read_paths.append(path), real_read(path, size))[1])
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: (read_members.append(m.name), real_extract(self, m))[1])
    outcome, _, _ = _collect(iter_batches([root], PP, 8, skip=skipped.__contains__))
    assert outcome == {k: v for k, v in expected.items() if k not in skipped}
    assert str(root / "good.jpg") not in read_paths and str(root / "text.jpg") not in read_paths
    assert str(root / "good.png") in read_paths
    assert "../escape.jpg" not in read_members and "normal/ok.jpg" in read_members


def test_exif_rotation_is_applied(corpus):
    root, _ = corpus
    squash = dict(PP, resize_mode="squash")
    _, pixels, _ = _collect(iter_batches([root / EXIF_NAME], squash, 4))
    row = pixels[str(root / EXIF_NAME)]
    with Image.open(root / EXIF_NAME) as img:
        assert img.size == (64, 32)  # stored landscape: left half red, right half blue
        upright = img.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(row, eval_transform(squash)(upright))
    mean, std = torch.tensor(PP["mean"])[:, None], torch.tensor(PP["std"])[:, None]
    rgb = row.flatten(1) * std + mean  # back to [0, 1]
    top, bottom = rgb.view(3, 16, 16)[:, :6].mean((1, 2)), rgb.view(3, 16, 16)[:, -6:].mean((1, 2))
    assert top[0] > 0.9 and top[2] < 0.1 and bottom[2] > 0.9 and bottom[0] < 0.1  # red over blue


def test_dtype_and_decoder_choice(corpus, monkeypatch):
    """Catches: a wrong dtype out of the PIL path, or choose_decoder refusing/choosing wrongly."""
    root, _ = corpus
    (batch,) = list(iter_batches([root / "good.png"], PP, 4, dtype=torch.bfloat16))
    assert batch.pixels.dtype == torch.bfloat16 and len(batch.records) == 1
    assert backends.chosen()["decode"] == "pil"
    assert choose_decoder("auto", torch.device("cpu")) == "pil"
    with pytest.raises(ValueError, match="decoder must be"):
        choose_decoder("nvjpeg", torch.device("cpu"))
    monkeypatch.setattr(backends, "has_dali", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        choose_decoder("dali", torch.device("cpu"))
    monkeypatch.setattr(backends, "has_dali", lambda: True)
    assert choose_decoder("dali", torch.device("cpu")) == "dali"  # DALI's CPU pipeline
    assert choose_decoder("auto", torch.device("cpu")) == "pil"  # not faster there (benchmarks/)
    with pytest.raises(ValueError, match="resize_mode"):  # checked at the call, not lazily
        iter_batches([root], dict(PP, resize_mode="stretch"), 4)
    with pytest.raises(ValueError, match="batch_size"):
        iter_batches([root], PP, 0)


def test_routing_sends_only_plain_jpegs_to_dali(corpus):
    root, expected = corpus
    eligible = {p for p in expected if "::" not in p and os.path.isfile(p)
                and dali_eligible(open(p, "rb").read())}
    names = {os.path.basename(p) for p in eligible}
    plain = {"good.jpg", "upper.JPEG", "gray.jpg", "progressive.jpg", "link_good.jpg"}
    assert names == plain | ({os.fsdecode(b"caf\xe9.jpg")} if nonutf8_supported(root) else set())
    for refused in ("cmyk.jpg", EXIF_NAME, "truncated.jpg", "good.png", "good.webp",
                    "animated.gif", "bomb.png", "empty.jpg", "text.jpg", "gray16.png"):
        assert not dali_eligible((root / refused).read_bytes()), refused
    info = jpeg_info((root / "progressive.jpg").read_bytes())
    assert (info.sof, info.precision, info.components) == (0xC2, 8, 3)
    assert (info.width, info.height) == (64, 48)
    assert jpeg_info((root / "cmyk.jpg").read_bytes()).components == 4
    assert jpeg_info((root / EXIF_NAME).read_bytes()).orientation == 6
    assert [sniff((root / n).read_bytes()) for n in ("good.jpg", "good.png", "good.webp",
                                                     "animated.gif", "text.jpg")] == \
        ["jpeg", "png", "webp", "gif", "unknown"]


class _FakeGpu:
    """Stands in for ``DaliDecoder`` on CPU: decodes with PIL, fails batches holding ``poison``."""

    def __init__(self, poison: bytes = b""):
        self.seen: list[bytes] = []
        self.poison, self.failures = poison, 0
        self.transform = eval_transform(PP)

    def __call__(self, blobs):
        self.seen.extend(blobs)
        if self.poison and any(b == self.poison for b in blobs):
            self.failures += 1
            raise DaliFailure("simulated nvJPEG error")
        return torch.stack([self.transform(load_rgb(b)) for b in blobs])


def _dali_run(paths, gpu, batch_size=4):
    """The DALI path of ``iter_batches`` with ``gpu`` in DALI's place, on CPU."""
    ds = ScanDataset(paths, PP, batch_size, route=dali_eligible)
    as_records = lambda meta: [Record(*m) for m in meta]  # noqa: E731
    return _collect(Batch(as_records(m), p, as_records(e))
                    for m, p, e in iter_dali(make_loader(ds), gpu, PP, "cpu", prefetch=2))


def test_dali_path_routes_and_matches_pil(corpus):
    root, expected = corpus
    gpu = _FakeGpu()
    outcome, pixels, _ = _dali_run([root], gpu)
    assert outcome == expected
    assert gpu.seen and all(dali_eligible(b) for b in gpu.seen)
    assert (root / "good.jpg").read_bytes() in gpu.seen
    assert (root / "cmyk.jpg").read_bytes() not in gpu.seen
    _, pil_pixels, _ = _collect(iter_batches([root], PP, 4))
    assert pixels.keys() == pil_pixels.keys()
    for ident in pixels:
        torch.testing.assert_close(pixels[ident], pil_pixels[ident])


def test_dali_failure_falls_back_to_cpu(tmp_path):
    good = [jpeg_bytes(40, 30, seed=s) for s in range(5)]
    broken = jpeg_bytes(64, 64, seed=9)[:600] + b"\xff\xd9"  # looks whole, fails to decode
    assert dali_eligible(broken)
    for i, blob in enumerate(good):
        (tmp_path / f"{i}.jpg").write_bytes(blob)
    (tmp_path / "broken.jpg").write_bytes(broken)
    (tmp_path / "other.png").write_bytes(png_bytes(seed=3))
    gpu = _FakeGpu(poison=broken)
    outcome, pixels, records = _dali_run([tmp_path], gpu, batch_size=3)
    assert gpu.failures == 1
    assert outcome == {**{str(tmp_path / f"{i}.jpg"): "ok" for i in range(5)},
                       str(tmp_path / "broken.jpg"): "error", str(tmp_path / "other.png"): "ok"}
    reason = records[str(tmp_path / "broken.jpg")].error
    assert "DALI decode failed too" in reason and "simulated nvJPEG error" in reason


@pytest.mark.gpu
def test_dali_matches_pil_on_gpu(tmp_path):
    if not backends.has_dali():
        pytest.skip("nvidia-dali is not installed")
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(96 + 8 * i, 72, seed=i))
    pp = dict(PP, size=32)
    runs = {}
    for decoder in ("dali", "pil"):
        _, pixels, _ = _collect(iter_batches([tmp_path], pp, 4, device="cuda", decoder=decoder))
        runs[decoder] = pixels
    assert runs["dali"].keys() == runs["pil"].keys() and len(runs["pil"]) == 8
    torch.manual_seed(0)
    head = torch.randn(3 * 32 * 32, device="cuda") / 55  # a fixed linear "detector" score
    for ident, pil in runs["pil"].items():
        dali = runs["dali"][ident]
        assert dali.device.type == "cuda"
        assert (dali - pil).abs().mean() < 0.05  # decoders and resamplers differ by a few levels
        assert abs(float(dali.flatten() @ head) - float(pil.flatten() @ head)) < 0.05
