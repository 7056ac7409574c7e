"""``predict`` takes one image in any form — path, bytes, binary file, PIL image of any mode,
numpy array, uint8 tensor — and scores it as the same file on disk; an unusable item is named
(``errors="raise"``) or scored NaN with its reason (``errors="skip"``). Both detectors."""
from __future__ import annotations

import io
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.data.images import InputError, load_rgb, to_rgb_image
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 40, 52  # not square: UniGenDet keeps the aspect, MiraGe crops
_RNG = np.random.default_rng(0)
RGB = (_RNG.random((H, W, 3)) * 255).astype(np.uint8)
ALPHA = (_RNG.random((H, W)) * 255).astype(np.uint8)
GREY16 = (_RNG.random((H, W)) * 65535).astype(np.uint16)


def _in_memory(mode: str) -> Image.Image:
    """An image of ``mode`` whose pixels are not the same seen through a naive conversion."""
    base = Image.fromarray(RGB)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([np.asarray(base.convert("L")), ALPHA]), "LA")
    if mode == "P":
        return base.quantize(64)
    if mode == "P+transparency":  # palette index 0 is transparent: composited on white
        img = base.quantize(64)
        img.info["transparency"] = 0
        return img
    if mode == "I;16":
        return Image.fromarray(GREY16)
    return base.convert(mode)  # RGB, L, 1, CMYK


MODES = ["RGB", "RGBA", "P", "P+transparency", "L", "LA", "1", "I;16", "CMYK"]


def _write(img: Image.Image, mode: str, tmp_path) -> str:
    path = str(tmp_path / (f"{mode.replace(';', '').replace('+', '_')}." + ("tiff" if mode == "CMYK" else "png")))
    img.save(path, transparency=img.info["transparency"]) if "transparency" in img.info else img.save(path)
    return path


def _forms(img: Image.Image, path: str) -> dict:
    """Every in-memory form of the image that ``path`` holds."""
    with open(path, "rb") as f:
        data = f.read()
    forms = {"PIL": img, "bytes": data, "file": io.BytesIO(data), "bytearray": bytearray(data)}
    arr = np.asarray(img)
    if img.mode in ("RGB", "RGBA", "L", "I;16"):
        forms["numpy"] = arr
    if img.mode in ("RGB", "RGBA", "L"):
        t = torch.from_numpy(arr.copy())
        forms["tensor HWC" if t.ndim == 3 else "tensor HW"] = t
        if t.ndim == 3:
            forms["tensor CHW"] = t.permute(2, 0, 1)
    return forms


@pytest.fixture(scope="module")
def mirage():
    return MiraGe(MiraGeConfig.named("tiny")).eval()


@pytest.fixture(scope="module")
def unigendet():
    return UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()


def _as_one(pixels) -> list[torch.Tensor]:
    return list(pixels)  # MiraGe: a (N, 3, H, W) batch; UniGenDet: a list of (3, H_i, W_i)


@pytest.mark.parametrize("mode", MODES)
def test_pil_modes_convert_as_their_file_does(mode, tmp_path):
    img = _in_memory(mode)
    path = _write(img, mode, tmp_path)
    assert Image.open(path).mode == img.mode  # the file really holds this mode
    from_file = np.asarray(load_rgb(path))
    assert np.array_equal(np.asarray(to_rgb_image(img)), from_file)
    if mode in ("RGBA", "LA", "P+transparency"):  # alpha matters: a plain convert would differ
        assert not np.array_equal(np.asarray(img.convert("RGB")), from_file)


@pytest.mark.parametrize("detector", ["mirage", "unigendet"])
@pytest.mark.parametrize("mode", MODES)
def test_every_form_scores_as_the_path(detector, mode, tmp_path, request):
    model = request.getfixturevalue(detector)
    img = _in_memory(mode)
    path = _write(img, mode, tmp_path)
    forms = _forms(img, path)
    names = ["path"] + list(forms)
    items = [path] + list(forms.values())
    pixels = _as_one(model.preprocess(items))
    for name, px in zip(names[1:], pixels[1:]):
        assert torch.equal(px, pixels[0]), f"{mode} given as {name} is not preprocessed as its file"
    scores = model.predict(items)  # the file object again: read from its start
    assert scores.shape == (len(items),) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, scores[:1].expand(len(items)), rtol=0, atol=1e-6)


def test_exif_orientation_of_an_opened_image_is_applied_as_for_its_path(mirage, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = str(tmp_path / "rot.jpg")
    Image.fromarray(RGB).save(path, exif=exif)
    opened = Image.open(path)
    assert to_rgb_image(opened).size == (H, W) == load_rgb(path).size
    assert torch.equal(mirage.preprocess(Image.open(path)), mirage.preprocess(path))


def test_uint8_batches_and_a_single_array(mirage, tmp_path):
    path = _write(Image.fromarray(RGB), "RGB", tmp_path)
    want = mirage.preprocess([path, path])
    assert torch.equal(mirage.preprocess(np.stack([RGB, RGB])), want)  # (N, H, W, C)
    chw = torch.from_numpy(RGB).permute(2, 0, 1)
    assert torch.equal(mirage.preprocess(torch.stack([chw, chw])), want)  # (N, C, H, W)
    one = mirage.predict(RGB)  # a single array is one image, not a batch of rows
    assert one.shape == (1,)


def _files(tmp_path):
    good = []
    for i in range(2):
        p = tmp_path / f"good{i}.png"
        Image.fromarray(np.roll(RGB, 7 * i, axis=1)).save(p)
        good.append(str(p))
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return good, str(bad)


@pytest.mark.parametrize("detector", ["mirage", "unigendet"])
def test_a_corrupt_file_is_named_or_skipped(detector, tmp_path, caplog, request):
    model = request.getfixturevalue(detector)
    (g0, g1), bad = _files(tmp_path)
    with pytest.raises(InputError, match=r"item 1 \('.*corrupt\.png'\)") as err:
        model.predict([g0, bad, g1])
    assert err.value.index == 1 and err.value.reason
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses worker processes

    alone = model.predict([g0, g1])
    with caplog.at_level(logging.WARNING, logger="aigid"):
        scores, errors = model.predict([g0, bad, g1, str(tmp_path / "missing.png")], errors="skip",
                                       return_errors=True)
    assert set(errors) == {1, 3} and errors[3] == "file not found"
    assert math.isnan(scores[1]) and math.isnan(scores[3])
    torch.testing.assert_close(scores[[0, 2]], alone, rtol=0, atol=1e-6)  # neighbours unchanged
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "corrupt.png" in logged and "missing.png" in logged

    plain = model.predict([bad], errors="skip")  # nothing usable: NaN, no model call fails
    assert plain.shape == (1,) and math.isnan(plain[0])


@pytest.mark.parametrize("detector", ["mirage", "unigendet"])
def test_a_float_tensor_must_be_preprocessed_pixels(detector, request):
    model = request.getfixturevalue(detector)
    with pytest.raises(InputError, match=r"\(3, H, W\).*got \(32, 32, 3\) \(channels last\?\)"):
        model.predict(torch.rand(32, 32, 3))
    with pytest.raises(InputError, match="values reach 200"):  # raw 0–255 pixels as float
        model.predict(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(InputError, match=r"item 1 \(tensor \(32, 32\) float32\)"):
        model.predict([torch.zeros(3, 32, 32), torch.zeros(32, 32)])
    with pytest.raises(InputError, match="item 0 .*dtype float64 are not images"):
        model.predict(np.zeros((32, 32, 3)))
    with pytest.raises(InputError, match="unsupported input type int"):
        model.predict([3])
    with pytest.raises(ValueError, match="errors must be"):
        model.predict(RGB, errors="ignore")


def test_text_mode_file_is_refused_with_a_reason(mirage, tmp_path):
    path = _write(Image.fromarray(RGB), "RGB", tmp_path)
    with open(path, encoding="latin-1") as f, pytest.raises(
            InputError, match=r"item 0 \(file '.*RGB\.png'\): .*binary mode"):
        mirage.predict(f)


def test_unigendet_skip_keeps_latents_with_their_images(unigendet, tmp_path):
    (g0, g1), bad = _files(tmp_path)
    px = unigendet.preprocess([g0, g1])
    lat = unigendet.encode_latents(px)
    alone = unigendet.predict(px, latents=lat)
    wrong = torch.zeros(32, 32)  # a float tensor of the wrong shape, with a latent of its own
    scores = unigendet.predict([px[0], wrong, px[1]], latents=[lat[0], lat[0], lat[1]], errors="skip")
    assert math.isnan(scores[1])
    torch.testing.assert_close(scores[[0, 2]], alone, rtol=0, atol=1e-6)
