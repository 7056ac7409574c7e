"""Hugging Face conventions: HF-style config keys, the model card, the image-classification
pipeline wrapper (under the ``[hf]`` extra)."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.models.card import write_model_card
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mirage_dir(tmp_path_factory):
    model = MiraGe(copy.deepcopy(MiraGeConfig.named("tiny")), seed=1).eval()
    with torch.no_grad():  # prompts away from init, so P(fake) is not ~0.5 everywhere
        for p in model.prompts.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    folder = tmp_path_factory.mktemp("mirage")
    model.save_pretrained(folder)
    return folder, model


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


# ---- config.json and the card ----------------------------------------------------------------
def test_config_has_hf_keys_and_old_and_new_folders_load(mirage_dir, tmp_path):
    """Catches HF keys missing from config.json, or the loader choking on them (MiraGeConfig
    rejects unknown fields) or on folders written before they existed."""
    folder, model = mirage_dir
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "aigid-mirage" and raw["architectures"] == ["MiraGe"]
    assert raw["id2label"] == {"0": "real", "1": "fake"} and raw["label2id"] == {"real": 0, "fake": 1}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(MiraGe.from_pretrained(folder).predict(x), model.predict(x), atol=0, rtol=0)
    old = tmp_path / "old"
    old.mkdir()
    for f in ("model.safetensors", "backbone.safetensors"):
        (old / f).write_bytes((folder / f).read_bytes())
    (old / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in
                                                 ("model_type", "architectures", "id2label", "label2id")}))
    torch.testing.assert_close(MiraGe.from_pretrained(old).predict(x), model.predict(x), atol=0, rtol=0)


def test_inverted_labels_or_another_model_type_are_refused(mirage_dir, tmp_path):
    """Catches a hand-edited config.json whose id2label says 0 = fake (the HF wrapper would then
    name predict's P(fake) "real") or a folder of another detector being loaded as MiraGe."""
    folder, _ = mirage_dir
    raw = json.loads((folder / "config.json").read_text())
    for bad in ({"id2label": {"0": "fake", "1": "real"}}, {"model_type": "aigid-unigendet"}):
        (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        (tmp_path / "backbone.safetensors").write_bytes((folder / "backbone.safetensors").read_bytes())
        (tmp_path / "config.json").write_text(json.dumps({**raw, **bad}))
        with pytest.raises(ValueError, match="id2label|model_type"):
            MiraGe.from_pretrained(tmp_path)


def test_unigendet_folder_has_hf_keys_and_reloads(tmp_path):
    """Catches UniGenDetConfig.from_dict rejecting the HF keys its own save_pretrained writes."""
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "aigid-unigendet" and raw["architectures"] == ["UniGenDet"]
    assert UniGenDet.from_pretrained(tmp_path).config == model.config
    card = (tmp_path / "README.md").read_text()
    assert "MIT" in card and "BAGEL" in card  # the license note of the public code and weights


def test_model_card_front_matter_and_training_summary(mirage_dir, tmp_path):
    """Catches a card without the hub's front matter, one that hides that a random backbone is a
    toy, or one that ignores the training summary (data, metrics) it is given."""
    folder, model = mirage_dir
    card = (folder / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: aigid" in head and "pipeline_tag: image-classification" in head
    assert "- mirage" in head and "license" not in head  # no license claimed unless given
    assert "toy" in body and "Not recorded" in body and "No evaluation recorded" in body
    for section in ("## Detector", "## Training data", "## Preprocessing", "## Metrics",
                    "## Intended use", "## Limits"):
        assert section in body
    summary = {"config": {"data": "/data/genimage/", "epochs": 2, "lr": 0.002},
               "train_data": {"total": 10, "per_generator": {"sdv1.4": {"real": 5, "fake": 5}}},
               "train_split": "train", "steps": 7, "device": "cpu",
               "val": {"overall": {"n": 4, "acc": 0.75, "auroc": 0.875, "ap": None},
                       "protocol": {"threshold": 0.5}}}
    tmp_path.joinpath("x").mkdir()
    card = open(write_model_card(tmp_path / "x", model, summary, license="apache-2.0")).read()
    assert "license: apache-2.0" in card and "- genimage" in card  # datasets from the data folder
    assert "sdv1.4: 5 real, 5 fake" in card and "7 steps" in card
    assert "| acc | 0.7500 |" in card and "| auroc | 0.8750 |" in card and "| ap |" not in card
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["README.md"]  # no temp file left


# ---- the transformers pipeline (the [hf] extra) ----------------------------------------------
def test_pipeline_gives_predicts_p_fake_with_id2label(mirage_dir):
    """Catches the wrapper's logits in the wrong class order (P(fake) labelled "real"), the
    pipeline's labels falling back to LABEL_0/LABEL_1, or preprocessing unlike predict's."""
    pytest.importorskip("transformers")
    from transformers import pipeline
    from aigid.export.hf import AigidForImageClassification, AigidImageProcessor
    folder, model = mirage_dir
    clf = pipeline("image-classification", model=AigidForImageClassification.from_pretrained(folder),
                   image_processor=AigidImageProcessor.from_pretrained(folder))
    images = _images(3)
    expected = model.predict(images)
    assert expected.std() > 1e-3
    for img, p in zip(images, expected.tolist()):
        out = clf(img)
        assert {o["label"] for o in out} == {"real", "fake"}
        scores = {o["label"]: o["score"] for o in out}
        assert scores["fake"] == pytest.approx(p, abs=1e-6)
        assert scores["real"] == pytest.approx(1 - p, abs=1e-6)
        assert out[0]["score"] >= out[1]["score"]


def test_pipeline_loads_a_folder_by_path_and_never_a_hub_id(mirage_dir, monkeypatch):
    """Catches the Auto* registration missing (pipeline(model=folder) fails) and a hub id that
    reaches the network instead of failing at once."""
    pytest.importorskip("transformers")
    from transformers import pipeline
    from aigid.export.hf import AigidForImageClassification, AigidImageProcessor
    folder, model = mirage_dir
    clf = pipeline("image-classification", model=str(folder),
                   image_processor=AigidImageProcessor.from_pretrained(folder))
    assert type(clf.model).__name__ == "MiraGeForImageClassification"
    img = _images(1)[0]
    fake = {o["label"]: o["score"] for o in clf(img)}["fake"]
    assert fake == pytest.approx(model.predict(img).item(), abs=1e-6)
    import socket
    def no_network(*a, **k):
        raise AssertionError("network use")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(OSError, match="local"):
        AigidForImageClassification.from_pretrained("someone/some-detector")


def test_pipeline_runs_unigendet(tmp_path):
    """Catches UniGenDet's head order (class 0 = fake) passed through unconverted to id2label's
    [real, fake]."""
    pytest.importorskip("transformers")
    from transformers import pipeline
    from aigid.export.hf import AigidForImageClassification, AigidImageProcessor
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    model.save_pretrained(tmp_path)
    clf = pipeline("image-classification", model=AigidForImageClassification.from_pretrained(tmp_path),
                   image_processor=AigidImageProcessor.from_pretrained(tmp_path))
    img = _images(1)[0]
    fake = {o["label"]: o["score"] for o in clf(img)}["fake"]
    assert fake == pytest.approx(model.predict(img).item(), abs=1e-5)
