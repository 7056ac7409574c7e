"""Labelled-folder discovery (by name, never by sort order) and robust image decoding."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.data.dataset import LabelledImages, collate_skipping_errors
from aigid.data.images import ImageError, load_rgb
from aigid.data.labelled import discover, format_bias, has_split, summarise
from aigid.data.transforms import eval_transform


def _png(path, color=(10, 20, 30), size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_real_fake_folder(tmp_path):
    _png(tmp_path / "real" / "a.png")
    _png(tmp_path / "Fake" / "b.png")
    (tmp_path / "real" / "notes.txt").write_text("not an image")
    items = discover(str(tmp_path))
    assert [(os.path.basename(s.path), s.label, s.generator) for s in items] == [("b.png", 1, ""), ("a.png", 0, "")]


def test_genimage_layout_with_inner_folder_and_splits(tmp_path):
    for gen, inner in (("ADM", "imagenet_ai_0508_adm"), ("sdv14", "imagenet_ai_0419_sdv4")):
        for split in ("train", "val"):
            _png(tmp_path / gen / inner / split / "ai" / f"{split}.png")
            _png(tmp_path / gen / inner / split / "nature" / f"{split}.png")
    train = discover(str(tmp_path), "train")
    assert len(train) == 4 and all("/train/" in s.path for s in train)
    assert {(s.generator, s.label) for s in train} == {("ADM", 1), ("ADM", 0), ("sdv14", 1), ("sdv14", 0)}
    assert has_split(str(tmp_path), "val") and not has_split(str(tmp_path), "test")
    # 'ai' is fake (1) and 'nature' real (0): the inverse of what sorted folder names would give
    assert all((s.label == 1) == ("/ai/" in s.path) for s in train)
    assert summarise(train)["per_generator"]["ADM"] == {"real": 1, "fake": 1}


def test_forensynths_layout(tmp_path):
    _png(tmp_path / "progan" / "car" / "0_real" / "x.png")
    _png(tmp_path / "progan" / "car" / "1_fake" / "y.png")
    items = discover(str(tmp_path))
    assert {(s.generator, s.label) for s in items} == {("progan", 0), ("progan", 1)}


def test_manifests(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    (tmp_path / "m.csv").write_text("path,label,generator\nimgs/a.png,real,\nimgs/b.png,1,sd\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "imgs/b.png", "label": "fake"}) + "\n")
    csv_items = discover(str(tmp_path / "m.csv"))
    assert [(s.label, s.generator) for s in csv_items] == [(0, ""), (1, "sd")]
    assert os.path.isabs(csv_items[0].path) and os.path.exists(csv_items[0].path)
    assert discover(str(tmp_path / "m.jsonl"))[0].label == 1
    (tmp_path / "bad.csv").write_text("path,label\nimgs/a.png,maybe\n")
    with pytest.raises(ValueError, match="unknown label"):
        discover(str(tmp_path / "bad.csv"))


def test_missing_root():
    with pytest.raises(FileNotFoundError):
        discover("/nonexistent/dataset")


def test_format_bias_is_flagged(tmp_path):
    from aigid.data.labelled import LabelledImage
    items = [LabelledImage("a.jpg", 0, ""), LabelledImage("b.png", 1, "")]
    assert "format bias" in format_bias(items)
    assert format_bias([LabelledImage("a.png", 0, ""), LabelledImage("b.png", 1, "")]) is None


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_modes_to_rgb():
    cmyk = _encode(Image.new("CMYK", (5, 4), (0, 255, 0, 0)), "JPEG")
    gray16 = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    palette = Image.new("P", (5, 4), 3)
    rgba = Image.new("RGBA", (5, 4), (255, 0, 0, 0))  # fully transparent red → white background
    for data in (cmyk, _encode(gray16, "PNG"), _encode(palette, "PNG"), _encode(rgba, "PNG")):
        img = load_rgb(data)
        assert img.mode == "RGB" and img.size == (5, 4)
    assert load_rgb(_encode(gray16, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_and_first_frame():
    img = Image.new("RGB", (6, 3), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    assert load_rgb(_encode(img, "JPEG", exif=exif)).size == (3, 6)
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = load_rgb(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and g < 50


@pytest.mark.parametrize("case", ["truncated", "empty", "text", "bomb", "missing"])
def test_bad_files_raise_image_error_with_reason(case, tmp_path, monkeypatch):
    jpeg = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    if case == "truncated":
        src = jpeg[: len(jpeg) // 2]
    elif case == "empty":
        src = b""
    elif case == "text":
        src = b"hello, I am not a JPEG"
    elif case == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        src = jpeg  # 4096 pixels declared > 1000
    else:
        src = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageError) as err:
        load_rgb(src)
    assert str(err.value)


def test_dataset_skips_bad_files_and_reports_them(tmp_path):
    _png(tmp_path / "real" / "ok.png", size=(40, 40))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = discover(str(tmp_path))
    pp = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    ds = LabelledImages(items, eval_transform(pp))
    batch = collate_skipping_errors([ds[0], ds[1]])
    assert batch["pixels"].shape == (1, 3, 32, 32)
    assert batch["labels"].tolist() == [0]
    assert len(batch["errors"]) == 1 and batch["errors"][0][0] == 0  # broken.png sorts first (fake/)
    assert collate_skipping_errors([ds[1]])["errors"] == []
    assert collate_skipping_errors([ds[0]])["pixels"] is None


def test_eval_transform_shortest_side_and_normalisation():
    pp = {"size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "shortest"}
    x = eval_transform(pp)(Image.new("RGB", (64, 32), (255, 128, 0)))
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([2.0, (128 / 255 - 0.5) / 0.25, -2.0]))
