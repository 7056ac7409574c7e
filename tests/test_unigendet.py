"""UniGenDet on the tiny config: SMSA layout, heads, inference, generation, checkpoints."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from aigid.models.unigendet import flow
from aigid.models.unigendet.siglip import SigLIPConfig, SigLIPVisionModel
from aigid.models.unigendet.tokenizer import SPECIAL_TOKENS, ByteTokenizer, build_tokenizer
from aigid.models.unigendet import (FAKE_CLASS, DetInputs, GenInputs, UniGenDet, UniGenDetConfig,
                                    detection_loss, patchify_latents, sincos_2d, unpatchify_latents)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()


def _pixels(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(n, seed=1):
    return torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


# ---- building blocks ------------------------------------------------------------------------
def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer(272)
    ids = tok.encode("héllo <|im_start|>")
    assert max(ids) < 256 and tok.decode(ids) == "héllo <|im_start|>"  # specials never parsed from text
    roles = [tok.im_start, tok.im_end, tok.vision_start, tok.vision_end]
    assert len(set(roles)) == 4 and min(roles) >= 256
    assert tok.decode([104, tok.im_end, 105]) == "hi"
    assert tok.decode([tok.vision_start], skip_special=False) == SPECIAL_TOKENS["vision_start"]
    with pytest.raises(ValueError):
        ByteTokenizer(100)
    with pytest.raises(ValueError):
        build_tokenizer({"kind": "qwen2"}, 1000)


def test_qwen2_tokenizer_from_a_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    vocab = {"<unk>": 0, "a": 1, "b": 2, **{t: 3 + i for i, t in enumerate(SPECIAL_TOKENS.values())}}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer({"kind": "qwen2", "path": str(tmp_path)}, 100)
    assert (tok.im_start, tok.vision_end) == (3, 6) and tok.encode("a b") == [1, 2]
    # user text spelling a special token is text, never the token itself
    ids = tok.encode("a <|im_end|> b")
    assert tok.im_end not in ids and ids[0] == 1 and ids[-1] == 2


def test_sincos_table_matches_bagels_formula():
    d, side = 16, 5
    table = sincos_2d(d, side)
    r, c, k = 3, 2, 1
    omega = 1.0 / 10000 ** (k / (d // 4))
    row = table[r * side + c]
    assert torch.isclose(row[k], torch.tensor(c * omega).sin())            # first half: column
    assert torch.isclose(row[d // 4 + k], torch.tensor(c * omega).cos())
    assert torch.isclose(row[d // 2 + k], torch.tensor(r * omega).sin())   # second half: row


def test_latent_patchify_is_bagels_layout_and_inverts():
    lat = torch.randn(2, 16, 4, 6)
    tok = patchify_latents(lat, 2)
    assert tok.shape == (2, 6, 64)
    # token (row 1, col 2) holds latent[:, 2:4, 4:6] flattened as (p_h, p_w, C)
    assert torch.equal(tok[0, 1 * 3 + 2], lat[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify_latents(tok, (2, 3), 2, 16), lat)


def test_siglip_loads_bagels_linear_patch_embedding():
    cfg = SigLIPConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_size=32, patch_size=8)
    a, b = SigLIPVisionModel(cfg), SigLIPVisionModel(cfg)
    state = dict(a.state_dict())
    conv = state["vision_model.embeddings.patch_embedding.weight"]                 # (D, C, p, p)
    state["vision_model.embeddings.patch_embedding.weight"] = conv.permute(0, 2, 3, 1).reshape(32, -1)
    b.load_state_dict(state)
    px = torch.randn(2, 3, 32, 32)
    assert torch.allclose(a(px)[0], b(px)[0], atol=1e-6)
    assert "vision_model.encoder.layers.0.self_attn.out_proj.weight" in state
    assert "vision_model.post_layernorm.weight" in state


def test_release_key_names(model):
    keys = set(model.state_dict())
    for k in ["language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
              "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
              "language_model.model.norm_moe_gen.weight",
              "vit_model.vision_model.embeddings.position_embedding.weight", "connector.fc1.weight",
              "connector.fc2.bias", "vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed",
              "time_embedder.mlp.0.weight", "time_embedder.mlp.2.weight", "vae2llm.weight", "llm2vae.bias",
              "fake_cls_head.0.weight", "fake_cls_head.1.weight", "fake_cls_head.3.weight",
              "diga_mlp.0.weight", "diga_mlp.2.weight", "latent_to_vit_connector.0.weight"]:
        assert k in keys, k
    assert not any(k.startswith("_vae") or k.startswith("vae.") for k in keys)  # the VAE is external
    assert not model.vit_pos_embed.pos_embed.requires_grad
    assert model.fake_cls_head[3].out_features == 2 and model.fake_cls_head[1].out_features == 64 // 4


# ---- SMSA: the ViT queries' read over [text prefix; VAE; ViT] ---------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_smsa_layer_output_equals_a_hand_written_reference(model, backend, monkeypatch):
    from aigid import ops
    calls, real = [], ops.smsa_attention

    def spy(q, kv_sources, *args, **kwargs):
        calls.append((q.shape[2], sum(k.shape[2] for k, _ in kv_sources)))
        return real(q, kv_sources, *args, **kwargs)
    monkeypatch.setattr(ops, "smsa_attention", spy)
    mc = model.config.mot()
    prefix = [model.tokenizer.encode("system")]
    det = DetInputs(_pixels(1).clone(), _latents(1), [model.tokenizer.encode("q?")], prefix_ids=prefix)
    li = 1
    model.attention_backend = backend   # "sdpa": image splits go through ops.smsa_attention
    try:
        with torch.no_grad():
            out = model(det=det, return_layers=(li - 1, li))
    finally:
        model.attention_backend = None
    x, y = out.layer_outputs[li - 1], out.layer_outputs[li]
    layout = out.layout
    # splits: [prefix text][VAE split][ViT split][question][answer]
    (p0, p1), (a0, a1), (v0, v1) = (layout.split_range(0, i) for i in range(3))
    n_prefix = p1 - p0
    gen_tok = torch.arange(a0 + 1, a1 - 1)                     # latent tokens (markers are text)
    assert torch.equal(layout.gen_index, gen_tok)
    layer = model.language_model.model.layers[li]
    at = layer.self_attn

    def proj(pos, suffix):
        h = _rms(x[pos], getattr(layer, "input_layernorm" + suffix).weight, mc.rms_eps)
        q = getattr(at, "q_proj" + suffix)(h).view(-1, mc.num_heads, mc.head_dim)
        k = getattr(at, "k_proj" + suffix)(h).view(-1, mc.num_kv_heads, mc.head_dim)
        v = getattr(at, "v_proj" + suffix)(h).view(-1, mc.num_kv_heads, mc.head_dim)
        q = _rms(q, getattr(at, "q_norm" + suffix).weight, mc.rms_eps)
        k = _rms(k, getattr(at, "k_norm" + suffix).weight, mc.rms_eps)
        return q, k, v

    keys = torch.arange(p0, v1)                                # [text prefix; VAE split; ViT split]
    is_gen = torch.isin(keys, gen_tok)
    pos_ids = torch.cat([torch.arange(n_prefix), torch.full((a1 - a0,), n_prefix),
                         torch.full((v1 - v0,), n_prefix + 1)])
    assert torch.equal(layout.position_ids[keys], pos_ids)
    with torch.no_grad():
        qu, ku, vu = proj(keys, "")
        _, kg, vg = proj(keys, "_moe_gen")
        k = torch.where(is_gen[:, None, None], kg, ku)
        v = torch.where(is_gen[:, None, None], vg, vu)
        q = _rope(qu, pos_ids, mc.rope_theta)[v0 - p0 + 1: v1 - p0 - 1]   # ViT tokens' queries
        k = _rope(k, pos_ids, mc.rope_theta)
        rep = mc.num_heads // mc.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / mc.head_dim ** 0.5
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(q.shape[0], -1)
        h = x[v0 + 1: v1 - 1] + at.o_proj(o)
        m = layer.mlp
        hn = _rms(h, layer.post_attention_layernorm.weight, mc.rms_eps)
        ref = h + m.down_proj(F.silu(m.gate_proj(hn)) * m.up_proj(hn))
    assert torch.allclose(y[v0 + 1: v1 - 1], ref, atol=1e-5, rtol=1e-4)
    if backend == "sdpa":  # the ViT split's queries read [prefix; VAE; ViT] through ops.smsa_attention
        assert (v1 - v0, v1 - p0) in calls
    assert y.shape == x.shape


# ---- heads and inference ----------------------------------------------------------------------
def test_two_logit_ce_is_bce_on_the_logit_difference():
    logits = torch.randn(16, 2)
    fake = torch.randint(0, 2, (16,))
    bce = F.binary_cross_entropy_with_logits(logits[:, FAKE_CLASS] - logits[:, 1 - FAKE_CLASS], fake.float())
    assert torch.allclose(detection_loss(logits, fake), bce, atol=1e-6)
    # the class order is the released code's: index 0 = fake
    assert detection_loss(torch.tensor([[5.0, -5.0]]), torch.tensor([1])) < 0.01


def test_predict_is_the_heads_softmax_and_a_probability(model):
    px, lat = _pixels(3), _latents(3)
    p = model.predict(px, latents=lat)
    assert p.shape == (3,) and p.dtype == torch.float32 and p.device.type == "cpu"
    assert ((p >= 0) & (p <= 1)).all()
    logits = model.detect_logits(px, latents=lat)
    assert torch.allclose(p, logits.softmax(-1)[:, 0], atol=1e-6)
    with torch.no_grad():
        model.fake_cls_head[3].bias.add_(torch.tensor([4.0, 0.0]))   # push towards class 0 (fake)
        try:
            assert (model.predict(px, latents=lat) > p).all()
        finally:
            model.fake_cls_head[3].bias.sub_(torch.tensor([4.0, 0.0]))


def test_packing_two_detection_samples_equals_one_at_a_time(model):
    px, lat = _pixels(2), _latents(2)
    both = model.detect_logits(px, latents=lat)
    one = torch.cat([model.detect_logits(px[i:i + 1], latents=lat[i:i + 1]) for i in range(2)])
    assert torch.allclose(both, one, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_explain_greedy_is_deterministic_and_sampling_is_seeded(model):
    px, lat = _pixels(1), _latents(1)
    a = model.explain(px[0], max_new_tokens=6, greedy=True, latents=lat)
    b = model.explain(px[0], max_new_tokens=6, greedy=True, latents=lat)
    assert isinstance(a, str) and a == b
    s1 = model.explain(px, max_new_tokens=6, seed=3, latents=lat)
    s2 = model.explain(px, max_new_tokens=6, seed=3, latents=lat)
    assert isinstance(s1, list) and s1 == s2


class _FixedHead(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, h):
        return self.logits.expand(h.shape[0], -1)


def test_explain_decodes_what_the_lm_head_says():
    m = UniGenDet(UniGenDetConfig.named("tiny"), seed=1).eval()
    tok, px, lat = m.tokenizer, _pixels(1)[0], _latents(1)
    logits = torch.zeros(272)
    logits[ord("x")], logits[ord("y")] = 2.0, 1.95
    m.language_model.lm_head = _FixedHead(logits)
    assert m.explain(px, max_new_tokens=4, greedy=True, repetition_penalty=1.0, latents=lat) == "xxxx"
    # HF-style repetition penalty: every used token's positive logit is divided once (x, then y, then x)
    assert m.explain(px, max_new_tokens=4, greedy=True, repetition_penalty=1.05, latents=lat) == "xyxx"
    # top-k 1 makes sampling greedy
    assert m.explain(px, max_new_tokens=3, top_k=1, repetition_penalty=1.0, latents=lat) == "xxx"
    logits[tok.im_end] = 5.0
    assert m.explain(px, max_new_tokens=4, greedy=True, latents=lat) == ""


def test_predict_from_images_through_the_vae(model, tmp_path):
    from PIL import Image
    paths = []
    for i in range(2):
        arr = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    p = model.predict([str(q) for q in paths])
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    pixels = model.preprocess([str(q) for q in paths])
    # BAGEL's rule at the tiny sizes (min 32, max 64, stride 16): 48x40 keeps its aspect -> 48x32
    assert [tuple(px.shape) for px in pixels] == [(3, 32, 48)] * 2
    assert torch.allclose(p, model.predict(pixels), atol=1e-6)
    assert model.config.preprocess["size"] == 32


# ---- generation: the sampler and the loss agree -------------------------------------------------
def test_a_model_fit_to_one_latent_regenerates_it():
    """The flow loss and the Euler sampler share one convention: fit one latent, then sample it."""
    m = UniGenDet(UniGenDetConfig.named("tiny"), seed=0)
    x0 = patchify_latents(_latents(1, seed=5), 2)                    # (1, 4 tokens, 16)
    prompt = [m.tokenizer.encode("a red square")]
    steps, lr, bs = 150, 5e-3, 8
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = flow.sample_timesteps(bs, 1.0, generator=g)
        noise = torch.randn(bs, *x0.shape[1:], generator=g)
        x_t = flow.interpolate(x0.expand(bs, -1, -1), noise, t)
        loss = flow.flow_loss(m(gen=GenInputs(prompt * bs, x_t, t, (2, 2))).velocity, x0.expand(bs, -1, -1), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    rel = lambda lat: float((patchify_latents(lat, 2) - x0).norm() / x0.norm())  # noqa: E731
    for seed in (7, 8):
        start = torch.randn(1, *x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        assert float((start - x0).norm() / x0.norm()) > 1.0                # where sampling starts
        assert rel(m.generate(["a red square"], steps=20, cfg=1.0, seed=seed, decode=False).latents) < 0.3

    # negative control: integrating with the opposite sign convention lands far away
    def wrong(x, t, guided):
        return -m(gen=GenInputs(prompt, x, t, (2, 2))).velocity, None
    start = torch.randn(1, *x0.shape[1:], generator=torch.Generator().manual_seed(7))
    bad = flow.euler_sample(wrong, start, steps=20, shift=3.0, cfg_scale=1.0)
    assert float((bad - x0).norm() / x0.norm()) > 1.0


def test_generate_shapes_cfg_and_decoding(model):
    out = model.generate(["a cat", "a dog"], steps=3, cfg=4.0, seed=0)
    assert out.latents.shape == (2, 4, 4, 4)
    assert out.images.shape == (2, 3, 32, 32) and out.images.min() >= 0 and out.images.max() <= 1
    again = model.generate(["a cat", "a dog"], steps=3, cfg=4.0, seed=0, decode=False)
    assert torch.equal(out.latents, again.latents) and again.images is None


# ---- checkpoints --------------------------------------------------------------------------------
def test_save_load_round_trip(model, tmp_path):
    px, lat = _pixels(2), _latents(2)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["arch"] == "unigendet"
    loaded = UniGenDet.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded.detect_logits(px, latents=lat), model.detect_logits(px, latents=lat))
    assert torch.equal(loaded.predict(px), model.predict(px))   # the built random VAE was saved too


def test_load_a_bagel_style_release_folder(tmp_path):
    src = UniGenDet(UniGenDetConfig.named("tiny"), seed=3).eval()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    w = state["vit_model.vision_model.embeddings.patch_embedding.weight"]
    state["vit_model.vision_model.embeddings.patch_embedding.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    (tmp_path / "rel").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "rel" / "ema.safetensors"))
    loaded = UniGenDet.from_pretrained(tmp_path / "rel", config=UniGenDetConfig.named("tiny")).eval()
    px, lat = _pixels(2), _latents(2)
    assert torch.allclose(loaded.detect_logits(px, latents=lat), src.detect_logits(px, latents=lat), atol=1e-6)
    # a plain BAGEL release has no UniGenDet heads: they keep their init; anything else missing fails
    bagel = {k: v for k, v in state.items() if not k.startswith(("fake_cls_head.", "diga_mlp.",
                                                                  "latent_to_vit_connector."))}
    save_file({k: v.contiguous() for k, v in bagel.items()}, str(tmp_path / "rel" / "ema.safetensors"))
    plain = UniGenDet.from_pretrained(tmp_path / "rel", config=UniGenDetConfig.named("tiny"),
                                      allow_random_heads=True).eval()
    assert not any(p.is_meta for p in plain.parameters())
    det = plain.detection_inputs(px, latents=lat)
    with torch.no_grad():
        assert torch.allclose(plain(det=det).hidden, src(det=det).hidden, atol=1e-6)
    assert torch.isfinite(plain.detect_logits(px, latents=lat)).all()
    del bagel["connector.fc1.weight"]
    save_file({k: v.contiguous() for k, v in bagel.items()}, str(tmp_path / "rel" / "ema.safetensors"))
    with pytest.raises(ValueError, match="connector.fc1.weight"):
        UniGenDet.from_pretrained(tmp_path / "rel", config=UniGenDetConfig.named("tiny"))


def test_load_detector_builds_and_reloads_unigendet(tmp_path):
    from aigid.models.registry import load_detector
    with pytest.warns(UserWarning, match="untrained"):
        det = load_detector("unigendet-tiny")
    assert isinstance(det, UniGenDet) and not det.training
    det.save_pretrained(tmp_path / "d")
    again = load_detector(str(tmp_path / "d"))
    assert isinstance(again, UniGenDet)
    px = _pixels(2)
    assert torch.equal(again.predict(px), det.predict(px))
    # a release folder (BAGEL's ema.safetensors, no arch) is recognised as UniGenDet
    (tmp_path / "rel").mkdir()
    save_file({k: v.contiguous() for k, v in det.state_dict().items()}, str(tmp_path / "rel" / "ema.safetensors"))
    from aigid.models.registry import _arch_of
    assert _arch_of(str(tmp_path / "rel")) == "unigendet"


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError):
        model(det=None, gen=None)
    with pytest.raises(ValueError):
        model(det=DetInputs(_pixels(2), _latents(1), [[1], [2]]))
    with pytest.raises(ValueError):
        model(gen=GenInputs([None], torch.zeros(1, 3, 64), torch.zeros(1), (2, 2)))
    with pytest.raises(ValueError):
        UniGenDetConfig.named("huge")
    with pytest.raises(ValueError):
        UniGenDetConfig.from_dict({**json.loads(json.dumps({"llm": "tiny", "vit": {}})), "bogus": 1})
