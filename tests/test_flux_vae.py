"""UniGenDet's VAE from BAGEL's ``ae.safetensors`` (Black Forest Labs' FLUX AE key layout).

The BFL layout here is written by hand from ByteDance-Seed/Bagel ``modeling/autoencoder.py``
(Encoder / Decoder / AttnBlock / ResnetBlock), independently of the converter under test, and a
plain-functional BFL forward pass checks that the loaded diffusers model computes the same thing.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from aigid.models.unigendet.vae import (FLUX_AE, build_vae, decode_latents, encode_latents, has_vae,
                                        vae_from_bfl_state)

# Three levels with equal widths at the first two, so a mis-ordered up block still has the right shapes.
CH, CH_MULT, NUM_RES, Z = 32, (1, 1, 2), 1, 4
TINY = {"block_out_channels": [CH * m for m in CH_MULT], "layers_per_block": NUM_RES, "latent_channels": Z}
SPEC = {"arch": TINY, "downsample": 4, "channels": Z, "scale": 0.3611, "shift": 0.1159}


pytestmark = pytest.mark.usefixtures("one_thread")


def bfl_layout(ch, ch_mult, num_res, z, cin=3, cout=3):
    """[(BFL key, diffusers key, BFL shape)] for every tensor of BFL's AutoEncoder."""
    rows = []

    def conv(bfl, dif, co, ci, k):
        rows.extend([(f"{bfl}.weight", f"{dif}.weight", (co, ci, k, k)),
                     (f"{bfl}.bias", f"{dif}.bias", (co,))])

    def norm(bfl, dif, c):
        rows.extend([(f"{bfl}.weight", f"{dif}.weight", (c,)), (f"{bfl}.bias", f"{dif}.bias", (c,))])

    def resnet(bfl, dif, ci, co):
        norm(f"{bfl}.norm1", f"{dif}.norm1", ci)
        conv(f"{bfl}.conv1", f"{dif}.conv1", co, ci, 3)
        norm(f"{bfl}.norm2", f"{dif}.norm2", co)
        conv(f"{bfl}.conv2", f"{dif}.conv2", co, co, 3)
        if ci != co:
            conv(f"{bfl}.nin_shortcut", f"{dif}.conv_shortcut", co, ci, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", c, c)
        norm(f"{side}.mid.attn_1.norm", f"{side}.mid_block.attentions.0.group_norm", c)
        for bfl, dif in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            conv(f"{side}.mid.attn_1.{bfl}", f"{side}.mid_block.attentions.0.{dif}", c, c, 1)  # 1×1 convs
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", c, c)

    n = len(ch_mult)
    conv("encoder.conv_in", "encoder.conv_in", ch, cin, 3)
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c, ch * m)
            c = ch * m
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", "encoder.conv_norm_out", c)
    conv("encoder.conv_out", "encoder.conv_out", 2 * z, c, 3)

    conv("decoder.conv_in", "decoder.conv_in", c, z, 3)
    mid("decoder", c)
    for i in reversed(range(n)):  # BFL keeps up.{i} at resolution level i; diffusers runs them in order
        d = n - 1 - i
        for j in range(num_res + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{d}.upsamplers.0.conv", c, c, 3)
    norm("decoder.norm_out", "decoder.conv_norm_out", c)
    conv("decoder.conv_out", "decoder.conv_out", cout, c, 3)
    return rows


# ---- an independent BFL forward pass (modeling/autoencoder.py, written from its structure) ------
class _Used(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.used = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k)


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)


def _norm(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _resnet(sd, p, x):
    h = _conv(sd, f"{p}.conv1", F.silu(_norm(sd, f"{p}.norm1", x)), padding=1)
    h = _conv(sd, f"{p}.conv2", F.silu(_norm(sd, f"{p}.norm2", h)), padding=1)
    return (_conv(sd, f"{p}.nin_shortcut", x) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _norm(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h).flatten(2).transpose(1, 2) for n in "qkv")
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{p}.proj_out", a)


def _mid(sd, side, h):
    h = _resnet(sd, f"{side}.mid.block_1", h)
    return _resnet(sd, f"{side}.mid.block_2", _attn(sd, f"{side}.mid.attn_1", h))


def bfl_encode_moments(sd, x):
    n = len(CH_MULT)
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for i in range(n):
        for j in range(NUM_RES):
            h = _resnet(sd, f"encoder.down.{i}.block.{j}", h)
        if i != n - 1:  # asymmetric padding, then a stride-2 conv
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _mid(sd, "encoder", h)
    return _conv(sd, "encoder.conv_out", F.silu(_norm(sd, "encoder.norm_out", h)), padding=1)


def bfl_decode(sd, z):
    h = _mid(sd, "decoder", _conv(sd, "decoder.conv_in", z, padding=1))
    for i in reversed(range(len(CH_MULT))):
        for j in range(NUM_RES + 1):
            h = _resnet(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"),
                      padding=1)
    return _conv(sd, "decoder.conv_out", F.silu(_norm(sd, "decoder.norm_out", h)), padding=1)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source():
    """A random tiny diffusers AutoencoderKL in the FLUX AE's shape: non-trivial norms, std ≠ 1."""
    torch.manual_seed(0)
    kw = {**FLUX_AE, **TINY, "down_block_types": ("DownEncoderBlock2D",) * 3,
          "up_block_types": ("UpDecoderBlock2D",) * 3}
    vae = AutoencoderKL(**kw).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("to_q.weight") or name.endswith("to_k.weight"):
                p.mul_(8)  # sharpen the attention so that q/k mix-ups show
        vae.encoder.conv_out.bias[Z:] = torch.linspace(-3, 1, Z)  # posterior std from 0.22 to 1.65
    return vae


def bfl_state(vae, ch=CH, ch_mult=CH_MULT, num_res=NUM_RES, z=Z):
    sd = vae.state_dict()
    rows = bfl_layout(ch, ch_mult, num_res, z)
    assert {dif for _, dif, _ in rows} == set(sd)  # the hand-written table covers the model exactly
    return {bfl: sd[dif].reshape(shape).clone() for bfl, dif, shape in rows}


@pytest.fixture(scope="module")
def ae_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("bagel") / "ae.safetensors"
    save_file(bfl_state(source), str(path))
    return path


def _pixels(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- loading --------------------------------------------------------------------------------------
def test_bfl_file_loads_into_the_same_model(source, ae_file):
    vae = build_vae({"path": str(ae_file), **SPEC})
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x, lat = _pixels(), torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(3))
    for name, t in source.state_dict().items():
        assert torch.equal(vae.state_dict()[name], t), name
    ours = encode_latents(vae, x, SPEC, sample=False)
    ref = encode_latents(source, x, SPEC, sample=False)
    assert ours.dtype == torch.float32 and ours.shape == (2, Z, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(decode_latents(vae, lat, SPEC), decode_latents(source, lat, SPEC),
                               rtol=0, atol=0)


def test_loaded_model_computes_bfls_forward(ae_file):
    """The diffusers model with FLUX_AE's kwargs is BFL's network: compare with a BFL forward."""
    vae = build_vae({"path": str(ae_file), **SPEC})
    sd = _Used(load_file(str(ae_file)))
    x, lat = _pixels(), torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(3))
    mean = bfl_encode_moments(sd, x).chunk(2, dim=1)[0]
    torch.testing.assert_close(encode_latents(vae, x, SPEC, sample=False),
                               SPEC["scale"] * (mean - SPEC["shift"]), rtol=1e-4, atol=1e-5)
    image = bfl_decode(sd, lat / SPEC["scale"] + SPEC["shift"])
    torch.testing.assert_close(decode_latents(vae, lat, SPEC), ((image + 1) / 2).clamp(0, 1),
                               rtol=1e-4, atol=1e-5)
    assert sd.used == set(sd)  # the reference pass read every tensor of the file


def test_folder_holding_ae_safetensors(source, ae_file, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / "ae.safetensors").write_bytes(ae_file.read_bytes())
    (release / "config.json").write_text(json.dumps({"model_type": "bagel"}))  # a release's own config
    vae = build_vae({"path": str(release), **SPEC})
    for name, t in source.state_dict().items():
        assert torch.equal(vae.state_dict()[name], t), name


def test_diffusers_folder_still_loads(source, tmp_path):
    source.save_pretrained(str(tmp_path / "vae"))
    (tmp_path / "vae" / "ae.safetensors").write_bytes(b"not read")  # the diffusers config wins
    vae = build_vae({"path": str(tmp_path / "vae")})
    x = _pixels()
    torch.testing.assert_close(encode_latents(vae, x, SPEC, sample=False),
                               encode_latents(source, x, SPEC, sample=False), rtol=0, atol=0)


def test_full_size_flux_layout_fits_flux_ae():
    """BAGEL's real ae.safetensors shapes (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 16) fit FLUX_AE."""
    rows = bfl_layout(128, (1, 2, 4, 4), 2, 16)
    state = {bfl: torch.empty(shape, device="meta") for bfl, _, shape in rows}
    vae = vae_from_bfl_state(state, {"downsample": 8, "channels": 16})
    assert sum(p.numel() for p in vae.parameters()) == sum(t.numel() for t in state.values())
    with pytest.raises(ValueError, match="latent channels"):
        vae_from_bfl_state(state, {"downsample": 8, "channels": 4})
    with pytest.raises(ValueError, match="×16"):
        vae_from_bfl_state(state, {"downsample": 16, "channels": 16})


@pytest.mark.parametrize("key", ["encoder.mid.attn_1.q.weight", "decoder.up.2.upsample.conv.bias",
                                 "encoder.down.0.downsample.conv.weight"])
def test_missing_key_raises_naming_it(source, key, tmp_path):
    state = bfl_state(source)
    del state[key]
    diffusers_name = {bfl: dif for bfl, dif, _ in bfl_layout(CH, CH_MULT, NUM_RES, Z)}[key]
    save_file(state, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match="missing") as e:
        build_vae({"path": str(tmp_path / "ae.safetensors"), **SPEC})
    assert diffusers_name in str(e.value) or key in str(e.value)  # named in either layout


@pytest.mark.parametrize("key", ["encoder.extra.weight", "decoder.up.0.attn.0.q.weight", "quant_conv.weight"])
def test_extra_key_raises_naming_it(source, key):
    state = {**bfl_state(source), key: torch.zeros(CH, CH, 1, 1)}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        vae_from_bfl_state(state, SPEC)


@pytest.mark.parametrize("key,shape", [("encoder.conv_in.weight", (CH, 3, 1, 1)),
                                       ("decoder.mid.attn_1.k.weight", (2 * CH, 2 * CH, 3, 3))])
def test_misshaped_key_raises_naming_it(source, key, shape):
    state = {**bfl_state(source), key: torch.zeros(shape)}
    with pytest.raises(ValueError, match="mis-shaped: " + key.replace(".", r"\.")):
        vae_from_bfl_state(state, SPEC)


def test_arch_override_must_match_the_file(ae_file):
    with pytest.raises(ValueError, match="mis-shaped"):
        build_vae({"path": str(ae_file), **SPEC, "arch": {**TINY, "block_out_channels": [32, 32, 32]}})


def test_init_and_has_vae():
    spec = {"init": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4},
            "downsample": 2, "channels": 4, "seed": 5}
    a, b = build_vae(spec), build_vae(spec)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(build_vae({**spec, "seed": 6}).parameters()), next(a.parameters()))
    with pytest.raises(ValueError, match="×2 down"):
        build_vae({**spec, "downsample": 8})
    assert has_vae(spec, None) and has_vae({}, a) and not has_vae({"path": None, "init": None}, None)
    with pytest.raises(RuntimeError, match="no VAE configured"):
        build_vae({"path": None, "init": None})


# ---- posterior sampling (BAGEL: z = mean + std·ε, then scale·(z − shift)) ------------------------
def test_sampling_is_seeded(source):
    x = _pixels()
    draw = lambda seed: encode_latents(source, x, SPEC, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.allclose(draw(1), draw(2))
    dist = source.encode(x).latent_dist
    mode = encode_latents(source, x, SPEC, sample=False)
    torch.testing.assert_close(mode, SPEC["scale"] * (dist.mean - SPEC["shift"]))
    assert not torch.allclose(draw(1), mode)
    torch.manual_seed(7)
    a = encode_latents(source, x, SPEC)
    torch.manual_seed(7)
    assert torch.equal(a, encode_latents(source, x, SPEC))  # no generator: the global CPU RNG


def test_sample_statistics_match_the_posterior(source):
    n = 256
    x = _pixels(1).expand(n, -1, -1, -1)
    draws = encode_latents(source, x, SPEC, generator=torch.Generator().manual_seed(0))
    mode = encode_latents(source, x[:1], SPEC, sample=False)[0]
    std = SPEC["scale"] * source.encode(x[:1]).latent_dist.std[0]
    assert (draws.mean(0) - mode).abs().max() < 5 * std.max() / n ** 0.5
    ratio = draws.std(0) / std
    assert ratio.mean().sub(1).abs() < 0.05 and (ratio - 1).abs().max() < 0.35


def test_one_generator_per_image_makes_latents_batch_independent(source):
    x = _pixels(3)
    gens = lambda n: [torch.Generator().manual_seed(4) for _ in range(n)]
    batch = encode_latents(source, x, SPEC, generator=gens(3))
    alone = encode_latents(source, x[2:], SPEC, generator=gens(1))
    torch.testing.assert_close(batch[2:], alone, rtol=1e-4, atol=1e-5)  # batched convs round differently
    assert not torch.allclose(batch, encode_latents(source, x, SPEC, generator=gens(3)[0]))
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        encode_latents(source, x, SPEC, generator=gens(2))
