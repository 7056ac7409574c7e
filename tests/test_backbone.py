"""Backbone loading: local checkpoints load exactly; missing weights fail clearly, offline."""
import pytest
import torch

from aigid.models.mirage.clip_backbone import BackboneUnavailable, build_backbone


def test_inline_config_loads_a_local_checkpoint(tiny_config, tmp_path):
    first = build_backbone(tiny_config.backbone)
    path = tmp_path / "tiny_clip.pt"
    torch.save(first.clip.state_dict(), path)
    second = build_backbone({**tiny_config.backbone, "pretrained": str(path)})
    assert second.has_weights and not first.has_weights
    for (k, a), (_, b) in zip(first.clip.state_dict().items(), second.clip.state_dict().items()):
        assert torch.equal(a, b), k
    assert second.preprocess["size"] == 32 and len(second.preprocess["mean"]) == 3


def test_missing_checkpoint_file(tiny_config):
    with pytest.raises(BackboneUnavailable, match="does not exist"):
        build_backbone({**tiny_config.backbone, "pretrained": "/nonexistent/clip.pt"})


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(BackboneUnavailable, match="openai"):
        build_backbone({"model": "ViT-B-32", "pretrained": "no-such-tag"})


def test_uncached_tag_fails_offline_with_advice(tmp_path):
    with pytest.raises(BackboneUnavailable, match="never downloads"):
        build_backbone({"model": "ViT-B-32", "pretrained": "openai"}, cache_dir=str(tmp_path))


def test_named_model_with_local_checkpoint_file(tmp_path):
    """The real open_clip path for named models, with a file instead of a download (ViT-B-32)."""
    import open_clip

    ref = open_clip.create_model("ViT-B-32")
    path = tmp_path / "vitb32.pt"
    torch.save(ref.state_dict(), path)
    bb = build_backbone({"model": "ViT-B-32", "pretrained": str(path)})
    assert torch.equal(bb.clip.visual.conv1.weight, ref.visual.conv1.weight)
    assert bb.preprocess["size"] == 224
    ids = bb.tokenizer(["X X Real."])
    assert ids.shape == (1, 77)
