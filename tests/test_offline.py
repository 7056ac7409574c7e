"""Nothing leaves the machine unless asked: missing weights fail at once, naming where aigid
looked, without a socket, an env var, or a download; ``download=True`` is the only way online.

The hub is made to believe it is online (conftest sets HF_HUB_OFFLINE for the whole suite), so
these tests prove the code stays offline by itself, not thanks to that variable.
"""
import os
import socket

import open_clip
import pytest
import torch

from aigid.data.aligned import fit_tiny_vae, load_vae, make_aligned
from aigid.models.mirage.clip_backbone import BackboneUnavailable, build_backbone
from aigid.models.mirage.model import MiraGe, MiraGeConfig


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every connect and name lookup is recorded and refused; the hub caches point at empty
    folders and the hub is told it is online, as in a user's process without HF_HUB_OFFLINE."""
    import huggingface_hub.constants as hub_constants

    attempts = []

    def refuse(what):
        def _refuse(*args, **kwargs):
            attempts.append((what, args[1:] if what != "getaddrinfo" else args[:2]))
            raise OSError(f"test guard: {what} refused")
        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    hub_cache = tmp_path / "hf-hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip
    # huggingface_hub 2.x fetches an "agent harness" registry (daily, cached on disk and in the
    # process) while building request headers, even for local_files_only calls: start each test
    # with neither cache so such a call would be seen.
    monkeypatch.setattr(hub_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"), raising=False)
    try:
        from huggingface_hub.utils import _detect_agent
        monkeypatch.setattr(_detect_agent, "_registry", None)
    except (ImportError, AttributeError):  # older huggingface_hub: no such registry
        pass
    return attempts, hub_cache


def _cache_hub_file(hub_cache, repo_id: str, filename: str, data: bytes = b"x") -> str:
    """Lay a file out as huggingface_hub's cache does (refs/main → snapshots/<rev>/file)."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    path = repo_dir / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_default_backbone_without_weights_fails_offline(no_network, tmp_path):
    attempts, hub_cache = no_network
    with pytest.raises(BackboneUnavailable) as info:
        MiraGe(MiraGeConfig.named("vit-l-14"))  # what `aigid train DATA` builds
    msg = str(info.value)
    assert attempts == []
    assert str(hub_cache) in msg and "vit_large_patch14_clip_224.openai" in msg
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-L-14.pt") in msg
    assert "download=True" in msg and "--allow-download" in msg
    assert "HF_HUB_OFFLINE" not in os.environ


def test_explicit_cache_dir_is_the_place_named(no_network, tmp_path):
    attempts, _ = no_network
    with pytest.raises(BackboneUnavailable, match="never downloads") as info:
        build_backbone({"model": "ViT-B-32", "pretrained": "openai"}, cache_dir=str(tmp_path / "cache"))
    assert attempts == [] and str(tmp_path / "cache") in str(info.value)


@pytest.mark.parametrize("where", ["hub", "url"])
def test_cached_tag_is_loaded_from_disk_as_a_file(no_network, tmp_path, monkeypatch, where):
    """A tag found in either of open_clip's caches reaches open_clip as a local file (so open_clip
    never asks the hub for a newer copy), with the tag's QuickGELU setting."""
    attempts, hub_cache = no_network
    if where == "hub":
        cached = _cache_hub_file(hub_cache, "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")
        cache_dir = None
    else:
        cache_dir = tmp_path / "clip-cache"
        cache_dir.mkdir()
        cached = str(cache_dir / "ViT-B-32.pt")
        open(cached, "wb").close()
        cache_dir = str(cache_dir)
    calls = []

    def fake_create(name, pretrained=None, **kwargs):  # a tiny CLIP stands in for ViT-B/32
        calls.append((name, pretrained, kwargs))
        return _tiny_clip()

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    bb = build_backbone({"model": "ViT-B-32", "pretrained": "openai"}, cache_dir=cache_dir)
    assert attempts == []
    (name, pretrained, kwargs), = calls
    assert name == "ViT-B-32" and pretrained == cached and kwargs["force_quick_gelu"] is True
    assert bb.has_weights and "HF_HUB_OFFLINE" not in os.environ


def _tiny_clip():
    return open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 16, "width": 32,
                                                    "layers": 1, "head_width": 16},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                    "layers": 1})


def test_download_true_is_the_way_online(no_network, monkeypatch):
    attempts, _ = no_network
    calls = []

    def fake_download(cfg, prefer_hf_hub=True, cache_dir=None):
        calls.append((cfg, cache_dir))
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake_download)
    with pytest.raises(BackboneUnavailable, match="never downloads"):
        build_backbone({"model": "ViT-L-14", "pretrained": "openai"})
    assert calls == []
    with pytest.raises(BackboneUnavailable, match="could not download"):
        build_backbone({"model": "ViT-L-14", "pretrained": "openai"}, cache_dir="/x", download=True)
    assert calls == [(open_clip.get_pretrained_cfg("ViT-L-14", "openai"), "/x")]
    assert "HF_HUB_OFFLINE" not in os.environ


def test_hub_text_towers_need_download(no_network):
    attempts, _ = no_network
    with pytest.raises(BackboneUnavailable, match="download=True"):
        build_backbone({"model": "xlm-roberta-base-ViT-B-32", "pretrained": "laion5b_s13b_b90k"})
    with pytest.raises(BackboneUnavailable, match="local-dir"):
        build_backbone({"model": "hf-hub:timm/some-clip", "pretrained": None})
    assert attempts == []


def test_make_aligned_with_an_uncached_hub_id_fails_offline(no_network, tmp_path):
    attempts, hub_cache = no_network
    (tmp_path / "real").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        make_aligned(str(tmp_path / "real"), str(tmp_path / "out"), "stabilityai/sd-vae-ft-mse", progress=False)
    msg = str(info.value)
    assert attempts == [] and str(hub_cache) in msg and "--allow-download" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("subfolder", ["", "vae"])
def test_a_cached_hub_vae_loads_without_a_socket(no_network, tmp_path, subfolder):
    attempts, hub_cache = no_network
    vae = fit_tiny_vae(torch.zeros(2, 3, 16, 16), steps=0)
    vae.save_pretrained(str(tmp_path / "saved"))
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        rel = f"{subfolder}/{f}" if subfolder else f
        _cache_hub_file(hub_cache, "someone/tiny-vae", rel, (tmp_path / "saved" / f).read_bytes())
    loaded = load_vae("someone/tiny-vae")
    assert attempts == [] and "HF_HUB_OFFLINE" not in os.environ
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_vae_download_true_lets_diffusers_fetch(no_network, monkeypatch):
    from diffusers import AutoencoderKL

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("no network in tests")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", fake_from_pretrained)
    with pytest.raises(FileNotFoundError, match="--allow-download"):
        load_vae("someone/uncached-vae")
    assert calls == []
    with pytest.raises(FileNotFoundError, match="cannot load a VAE"):
        load_vae("someone/uncached-vae", download=True)
    assert calls and all(kw["local_files_only"] is False for _, kw in calls)
