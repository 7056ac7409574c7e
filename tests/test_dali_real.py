"""The real DALI pipeline on the CPU (``device_id=None``): pixels, routing, batching, fallback.

``tests/test_decode.py`` checks the DALI path's plumbing with a stand-in decoder; this file runs
``nvidia.dali`` itself, so it skips where DALI is not installed.

Tolerances (normalised units; one 8-bit level is 1/255/std, 0.0150 for the CLIP std's smallest
channel). DALI and PIL compute the same bicubic, antialiased, pixel-aligned window
(``DaliDecoder._roi``), but each stage rounds on its own: the JPEG decoders (libjpeg-turbo in PIL,
nvImageCodec's CPU decoder in DALI) can differ by a level, and the resamplers round their 8-bit
outputs differently. Measured on photo-like JPEGs of 8 shapes at S = 16, 32, 224, both resize
modes: max 1.95 levels (one pixel of a 41x75 image; 1.0 elsewhere), mean <= 0.0031; bounds: two
levels and 0.005. On JPEGs of pure noise the decoders also upsample chroma detail at the Nyquist
limit differently: measured max 0.22, mean <= 0.0084; bounds 0.25 and 0.01.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from adversarial_corpus import EXIF_NAME, build_corpus, jpeg_bytes
from PIL import Image

pytest.importorskip("nvidia.dali")

from aigid import backends  # noqa: E402
from aigid.data import decode_dali  # noqa: E402
from aigid.data.batches import iter_batches  # noqa: E402
from aigid.data.decode_dali import DaliDecoder, DaliFailure, dali_eligible  # noqa: E402
from aigid.data.images import load_rgb  # noqa: E402
from aigid.data.transforms import eval_transform  # noqa: E402

PP = {"size": 16, "resize_mode": "shortest", "interpolation": "bicubic",
      "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
LEVEL = 1 / 255 / min(PP["std"])  # one 8-bit level in normalised units (0.0150)
SMOOTH_MAX, SMOOTH_MEAN = 2 * LEVEL + 0.002, 0.005
NOISE_MAX, NOISE_MEAN = 0.25, 0.01


def _smooth_jpeg(w: int, h: int, seed: int) -> bytes:
    """A photo-like JPEG: a coarse random image upsampled (no detail at the Nyquist limit)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h),
                                                                                  Image.BICUBIC)
    buf = io.BytesIO()
    low.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _junk_after_frame_header(data: bytes) -> bytes:
    """Bytes between SOF and the next marker: libjpeg (PIL) skips them with a warning, DALI's
    JPEG parser refuses the file ("Invalid marker"); ``dali_eligible`` only reads up to SOF."""
    sof = data.index(b"\xff\xc0")
    end = sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big")
    return data[:end] + b"\x00junk" + data[end:]


def _pil(data: bytes, pp: dict) -> torch.Tensor:
    return eval_transform(pp)(load_rgb(data))


def _collect(batches) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, str]]:
    outcome, pixels, errors = {}, {}, {}
    for batch in batches:
        assert batch.pixels.shape[0] == len(batch.records)
        for row, rec in zip(batch.pixels, batch.records):
            assert rec.id not in outcome
            outcome[rec.id], pixels[rec.id] = "ok", row
        for rec in batch.errors:
            assert rec.id not in outcome
            outcome[rec.id], errors[rec.id] = "error", rec.error
    return outcome, pixels, errors


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("size", [16, 32])
def test_pixels_agree_with_pil(mode, size):
    """Catches: a sub-pixel crop offset (DALI's resize_shorter + crop_pos rounds otherwise),
    y/x swapped in the ROI (portrait vs landscape), mean/std not scaled to 0-255, BGR or HWC out."""
    pp = dict(PP, size=size, resize_mode=mode)
    shapes = [(64, 48), (48, 64), (75, 41), (41, 75), (100, 100)]  # landscape, portrait, odd
    blobs = [_smooth_jpeg(w, h, seed) for seed, (w, h) in enumerate(shapes)]
    dali = DaliDecoder(pp, batch_size=8, device="cpu", threads=1)(blobs)
    assert dali.shape == (len(blobs), 3, size, size) and dali.dtype == torch.float32
    for row, data in zip(dali, blobs):
        diff = (row - _pil(data, pp)).abs()
        assert diff.max() < SMOOTH_MAX and diff.mean() < SMOOTH_MEAN, (diff.max(), diff.mean())
    noise = [jpeg_bytes(48 + 8 * i, 36 + 4 * i, seed=i) for i in range(3)]
    for row, data in zip(DaliDecoder(pp, 4, "cpu", threads=1)(noise), noise):
        diff = (row - _pil(data, pp)).abs()
        assert diff.max() < NOISE_MAX and diff.mean() < NOISE_MEAN, (diff.max(), diff.mean())


def test_short_last_batch_and_pipeline_reuse():
    """Catches: the last, short batch dropped, padded or mixed with stale samples of the previous
    batch, and a pipeline that raised being reused (DALI invalidates it)."""
    blobs = [_smooth_jpeg(40 + 4 * i, 30, seed=i) for i in range(5)]
    decoder = DaliDecoder(PP, batch_size=2, device="cpu", threads=1)
    together = decoder(blobs)  # batches of 2, 2, 1
    assert together.shape == (5, 3, 16, 16)
    alone = torch.cat([decoder([b]) for b in reversed(blobs)]).flip(0)
    torch.testing.assert_close(together, alone)
    broken = jpeg_bytes(64, 64, seed=8)[:600] + b"\xff\xd9"  # a frame header, then cut short
    with pytest.raises(DaliFailure, match="decoders.image"):  # DALI itself refused it
        decoder([blobs[0], broken])
    torch.testing.assert_close(decoder(blobs[:1]), together[:1])  # rebuilt after the failure
    assert decoder([]).shape == (0, 3, 16, 16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali") / "corpus"
    return root, build_corpus(root)


def test_iter_batches_dali_on_cpu_routes_like_pil(corpus):
    """Catches: choose_decoder refusing DALI on a CPU device, routing that loses or duplicates
    items, and files DALI mishandles (EXIF rotation, CMYK, truncated) reaching it anyway: every
    file that is not a plain JPEG must come out exactly as the PIL path gives it."""
    root, expected = corpus
    outcome, pixels, _ = _collect(iter_batches([root], PP, 3, device="cpu", decoder="dali",
                                               dali_threads=1))
    assert backends.chosen()["decode"] == "dali"
    assert outcome == expected
    _, pil_pixels, _ = _collect(iter_batches([root], PP, 3, device="cpu", decoder="pil"))
    assert pixels.keys() == pil_pixels.keys()
    via_dali = 0
    for ident, row in pixels.items():
        diff = (row - pil_pixels[ident]).abs()
        if "::" in ident:  # an archive member: plain JPEGs among them go to DALI too
            assert diff.max() < NOISE_MAX and diff.mean() < NOISE_MEAN, ident
        elif dali_eligible(open(ident, "rb").read()):
            via_dali += 1
            assert diff.max() < NOISE_MAX and diff.mean() < NOISE_MEAN, ident
        else:  # decoded by PIL in the worker: bit for bit what the PIL path gives
            assert torch.equal(row, pil_pixels[ident]), ident
    assert via_dali >= 5  # good, upper, gray, progressive, link_good
    assert not dali_eligible((root / EXIF_NAME).read_bytes())


def test_dali_failure_mid_batch_redecodes_with_pil(tmp_path, monkeypatch):
    """Catches: one file DALI refuses losing the rest of its batch, a DALI-refused file that PIL
    can read ending as an error, and a file both refuse vanishing instead of an error row."""
    good = [_smooth_jpeg(48, 36, seed=s) for s in range(5)]
    refused = _junk_after_frame_header(_smooth_jpeg(48, 36, seed=7))
    broken = jpeg_bytes(64, 64, seed=8)[:600] + b"\xff\xd9"  # cut inside the Huffman tables
    assert dali_eligible(refused) and dali_eligible(broken)
    names = {"0.jpg": good[0], "1.jpg": good[1], "2_refused.jpg": refused, "3.jpg": good[2],
             "4.jpg": good[3], "5_broken.jpg": broken, "6.jpg": good[4]}
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)
    failures = []
    real_call = DaliDecoder.__call__

    def counting(self, blobs):
        try:
            return real_call(self, blobs)
        except DaliFailure as err:
            failures.append(len(blobs))
            raise err

    monkeypatch.setattr(decode_dali.DaliDecoder, "__call__", counting)
    outcome, pixels, errors = _collect(iter_batches([tmp_path], PP, 3, device="cpu",
                                                    decoder="dali", dali_threads=1))
    ids = {name: str(tmp_path / name) for name in names}
    assert outcome == {ident: "error" if name == "5_broken.jpg" else "ok"
                       for name, ident in ids.items()}
    assert failures and all(n >= 1 for n in failures)
    assert "DALI decode failed too" in errors[ids["5_broken.jpg"]]
    torch.testing.assert_close(pixels[ids["2_refused.jpg"]], _pil(refused, PP), rtol=0, atol=0)
    for name in ("0.jpg", "1.jpg", "3.jpg", "4.jpg", "6.jpg"):
        diff = (pixels[ids[name]] - _pil(names[name], PP)).abs()
        assert diff.max() < SMOOTH_MAX, name
