"""The MoT backbone: expert routing, packing, masks, checkpointing and BAGEL-key checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from aigid.models import checkpoint as ckpt
from aigid.models.unigendet.mot import MoTConfig, MoTForCausalLM, MoTModel
from aigid.models.unigendet.rope import RotaryEmbedding, apply_rotary
from aigid.ops.packing import PackedLayout, Split


pytestmark = pytest.mark.usefixtures("one_thread")


DETECTION = [Split(3, "text"), Split(4, "vae"), Split(5, "vit"), Split(4, "text")]
GENERATION = [Split(3, "text"), Split(4, "vae", hidden=True)]


@pytest.fixture
def cfg() -> MoTConfig:
    return MoTConfig.named("tiny")


@pytest.fixture
def lm(cfg) -> MoTForCausalLM:
    torch.manual_seed(0)
    model = MoTForCausalLM(cfg).double()
    # Random norms and biases too, so that every parameter matters in the checks below.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def embeds(layout, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.total, cfg.hidden_size, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# An independent dense twin of one layer: both experts on every token, picked by token type,
# attention on the dense mask with K/V repeated to all heads (no index routing, no packing).
# ---------------------------------------------------------------------------------------------

def dense_layer(layer, x, layout, cos, sin):
    is_gen = torch.zeros(layout.total, 1, dtype=torch.bool)
    is_gen[layout.gen_index] = True
    attn = layer.self_attn

    def pick(name, h):  # both experts on every token, the right one kept per token
        owner = attn if hasattr(attn, name) else layer
        return torch.where(is_gen, getattr(owner, name + "_moe_gen")(h), getattr(owner, name)(h))
    h = pick("input_layernorm", x)
    n, g_heads = attn.num_heads, attn.num_heads // attn.num_kv_heads
    q = pick("q_proj", h).unflatten(-1, (n, -1))
    k = pick("k_proj", h).unflatten(-1, (attn.num_kv_heads, -1))
    v = pick("v_proj", h).unflatten(-1, (attn.num_kv_heads, -1))
    g3 = is_gen[:, :, None]
    q = torch.where(g3, attn.q_norm_moe_gen(q), attn.q_norm(q))
    k = torch.where(g3, attn.k_norm_moe_gen(k), attn.k_norm(k))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = torch.empty_like(q)
    for b in range(layout.num_samples):
        s, e = layout.sample_range(b)
        kk, vv = (t[s:e].repeat_interleave(g_heads, 1).transpose(0, 1) for t in (k, v))
        o[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), kk, vv,
                                                attn_mask=layout.dense_mask(b)).transpose(0, 1)
    x = x + pick("o_proj", o.flatten(1))
    return x + pick("mlp", pick("post_attention_layernorm", x))


def test_layer_matches_dense_twin(lm, cfg):
    model = lm.model
    layout = PackedLayout.build([DETECTION, GENERATION, [Split(6, "vit")], [Split(5, "vae")]])
    x = embeds(layout, cfg)
    cos, sin = model.rotary(layout.position_ids, x.dtype)
    for layer in model.layers[:2]:
        torch.testing.assert_close(layer(x, layout, (cos, sin)), dense_layer(layer, x, layout, cos, sin))


def test_rope_is_relative_and_norm_preserving():
    rope = RotaryEmbedding(16, theta=1e4)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 1, 16, generator=g, dtype=torch.float64) for _ in range(2))

    def score(m, n):
        cm, sm = rope(torch.tensor([m]), torch.float64)
        cn, sn = rope(torch.tensor([n]), torch.float64)
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum()
    # angles are computed in fp32 by design, hence the tolerance
    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))
    c, s = rope(torch.tensor([5]), torch.float64)
    torch.testing.assert_close(apply_rotary(q, c, s).norm(), q.norm())


@pytest.mark.parametrize("expert", ["gen", "und"])
def test_expert_weights_only_touch_their_tokens_in_that_layer(lm, cfg, expert):
    """Perturbing one expert's weights that act on its own tokens only (queries, o_proj, the MLP and
    its norm) changes layer 0's direct output for that expert's tokens and leaves the other
    expert's tokens exactly unchanged; from layer 1 on, attention mixes the change into both."""
    layout = PackedLayout.build([DETECTION, GENERATION])
    x = embeds(layout, cfg)
    before = lm.model(x, layout, return_layers=[0, 1]).layer_outputs
    sfx = "_moe_gen" if expert == "gen" else ""
    layer = lm.model.layers[0]
    with torch.no_grad():
        for mod in (getattr(layer, f"mlp{sfx}").up_proj, getattr(layer.self_attn, f"q_proj{sfx}"),
                    getattr(layer.self_attn, f"o_proj{sfx}"), getattr(layer, f"post_attention_layernorm{sfx}")):
            mod.weight.add_(0.5 * torch.randn_like(mod.weight))
    after = lm.model(x, layout, return_layers=[0, 1]).layer_outputs
    own, other = ((layout.gen_index, layout.und_index) if expert == "gen"
                  else (layout.und_index, layout.gen_index))
    assert torch.equal(after[0][other], before[0][other])
    assert (after[0][own] - before[0][own]).abs().amax(-1).min() > 1e-6  # every own token moved
    assert not torch.allclose(after[1][other], before[1][other])        # mixed in by layer 1


def test_packed_batch_equals_each_sample_alone(lm, cfg):
    samples = [DETECTION, GENERATION]
    layout = PackedLayout.build(samples)
    x = embeds(layout, cfg)
    packed = lm.model(x, layout, return_layers=[2])
    for b, sample in enumerate(samples):
        s, e = layout.sample_range(b)
        alone = lm.model(x[s:e], PackedLayout.build([sample]), return_layers=[2])
        torch.testing.assert_close(packed.last_hidden_state[s:e], alone.last_hidden_state)
        torch.testing.assert_close(packed.layer_outputs[2][s:e], alone.layer_outputs[2])


def test_text_is_causal(lm, cfg):
    layout = PackedLayout.build([[Split(9, "text")], DETECTION])
    x = embeds(layout, cfg)
    base = lm.model(x, layout).last_hidden_state
    x2 = x.clone()
    x2[6] += 1.0       # a later token of the first text sample
    x2[9 + 14] += 1.0  # the second-to-last token of the detection sample's question
    out = lm.model(x2, layout).last_hidden_state
    torch.testing.assert_close(out[:6], base[:6], rtol=0, atol=0)
    torch.testing.assert_close(out[9:9 + 14], base[9:9 + 14], rtol=0, atol=0)
    assert not torch.allclose(out[6:9], base[6:9]) and not torch.allclose(out[23:], base[23:])


@pytest.mark.parametrize("hidden", [True, False])
def test_hidden_vae_split_is_invisible(lm, cfg, hidden):
    sample = [Split(3, "text"), Split(4, "vae", hidden=hidden), Split(3, "text")]
    layout = PackedLayout.build([sample])
    x = embeds(layout, cfg)
    base = lm.model(x, layout).last_hidden_state
    x2 = x.clone()
    x2[3:7] += 1.0
    out = lm.model(x2, layout).last_hidden_state
    assert not torch.allclose(out[3:7], base[3:7])
    if hidden:
        torch.testing.assert_close(out[:3], base[:3], rtol=0, atol=0)
        torch.testing.assert_close(out[7:], base[7:], rtol=0, atol=0)
    else:  # the same change, visible: the later text reads it
        assert not torch.allclose(out[7:], base[7:])


def test_gradient_checkpointing_same_loss_and_grads(lm, cfg):
    layout = PackedLayout.build([DETECTION, GENERATION])
    x = embeds(layout, cfg).requires_grad_()

    def run(flag):
        lm.zero_grad()
        lm.model.gradient_checkpointing = flag
        out = lm.model(x, layout, return_layers=[1])
        loss = lm.logits(out.last_hidden_state).logsumexp(-1).mean() + out.layer_outputs[1].pow(2).mean()
        gx, = torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
        return loss.detach(), gx, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    loss0, gx0, g0 = run(False)
    loss1, gx1, g1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(gx1, gx0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(lm.parameters())) - 1  # all but embed_tokens
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_an_empty_expert_is_skipped(lm, cfg):
    layout = PackedLayout.build([[Split(4, "text"), Split(3, "vit")]])
    x = embeds(layout, cfg).requires_grad_()
    lm.model(x, layout).last_hidden_state.sum().backward()
    grads = {n: p.grad for n, p in lm.model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "moe_gen" in n)
    assert all(grads[n] is not None for n in grads if "moe_gen" not in n and "embed" not in n)


def test_bad_calls_raise(lm, cfg):
    layout = PackedLayout.build([GENERATION])
    x = embeds(layout, cfg)
    with pytest.raises(ValueError, match="return_layers"):
        lm.model(x, layout, return_layers=[cfg.num_layers])
    with pytest.raises(ValueError, match="inputs_embeds"):
        lm.model(x[:-1], layout)
    with pytest.raises(ValueError, match="unknown MoTConfig keys"):
        MoTConfig.from_dict({**cfg.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="no shipped MoT config"):
        MoTConfig.named("bagel-13b")
    with pytest.raises(ValueError, match="multiple"):
        MoTConfig(64, 1, 4, 3, 16, 128, 272)


def test_named_configs():
    big = MoTConfig.named("bagel-7b")
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim,
            big.intermediate_size, big.vocab_size) == (3584, 28, 28, 4, 128, 18944, 152064)
    tiny = MoTConfig.named("tiny")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim,
            tiny.intermediate_size, tiny.vocab_size) == (64, 4, 4, 2, 16, 128, 272)
    qwen = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 272, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
    assert MoTConfig.from_qwen2(qwen) == tiny


# ---------------------------------------------------------------------------------------------
# Checkpoints with BAGEL's key names
# ---------------------------------------------------------------------------------------------

def bagel_state(cfg: MoTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """A language-model state dict spelled with BAGEL's key names (from the upstream notes, not
    from our module), plus a few keys of BAGEL's other parts that must be ignored by prefix."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.05 * torch.randn(*shape, generator=g)  # noqa: E731
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    lm = "language_model."
    state = {lm + "model.embed_tokens.weight": r(cfg.vocab_size, h), lm + "lm_head.weight": r(cfg.vocab_size, h),
             "vit_model.vision_model.embeddings.patch_embedding.weight": r(8, 3, 2, 2),
             "connector.fc1.weight": r(h, 8), "time_embedder.mlp.0.weight": r(h, 4),
             "latent_pos_embed.pos_embed": r(16, h)}
    for sfx in ("", "_moe_gen"):
        state[f"{lm}model.norm{sfx}.weight"] = 1 + r(h)
        for i in range(cfg.num_layers):
            p = f"{lm}model.layers.{i}."
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                state[f"{p}self_attn.{name}_proj{sfx}.weight"] = r(rows, h)
                state[f"{p}self_attn.{name}_proj{sfx}.bias"] = r(rows)
            state[f"{p}self_attn.o_proj{sfx}.weight"] = r(h, q)
            state[f"{p}self_attn.q_norm{sfx}.weight"] = 1 + r(d)
            state[f"{p}self_attn.k_norm{sfx}.weight"] = 1 + r(d)
            state[f"{p}mlp{sfx}.gate_proj.weight"] = r(f, h)
            state[f"{p}mlp{sfx}.up_proj.weight"] = r(f, h)
            state[f"{p}mlp{sfx}.down_proj.weight"] = r(h, f)
            state[f"{p}input_layernorm{sfx}.weight"] = 1 + r(h)
            state[f"{p}post_attention_layernorm{sfx}.weight"] = 1 + r(h)
    return state


def test_bagel_checkpoint_round_trip(cfg, tmp_path):
    state = bagel_state(cfg)
    ckpt.save_state_dict(tmp_path / "ema.safetensors", state)
    loaded = ckpt.load_state_dict_dir(tmp_path)
    assert loaded.keys() == state.keys()

    model = MoTForCausalLM(cfg)
    layout = PackedLayout.build([DETECTION, GENERATION])
    x = embeds(layout, cfg).float()
    random_out = model(x, layout).last_hidden_state
    report = ckpt.load_into(model, loaded, prefix="language_model.")
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == sum(k.startswith("language_model.") for k in state)

    twin = MoTForCausalLM(cfg)  # built directly from the same tensors, without the loader
    twin.load_state_dict({k[len("language_model."):]: t for k, t in state.items()
                          if k.startswith("language_model.")}, strict=True)
    out, want = model(x, layout).last_hidden_state, twin(x, layout).last_hidden_state
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert not torch.allclose(out, random_out)
    torch.testing.assert_close(model.logits(out), twin.logits(want), rtol=0, atol=0)


def test_load_errors_name_the_keys(cfg):
    state = bagel_state(cfg)
    model = MoTForCausalLM(cfg)
    missing = dict(state)
    del missing["language_model.model.layers.2.mlp_moe_gen.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"1 missing keys.*layers\.2\.mlp_moe_gen\.up_proj\.weight"):
        ckpt.load_into(model, missing, prefix="language_model.")
    extra = {**state, "language_model.model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}
    with pytest.raises(RuntimeError, match=r"1 unexpected keys.*self_attn\.rotary\.inv_freq"):
        ckpt.load_into(model, extra, prefix="language_model.")
    wrong = {**state, "language_model.lm_head.weight": torch.zeros(10, cfg.hidden_size)}
    with pytest.raises(RuntimeError, match=r"shape mismatches.*lm_head\.weight: checkpoint \(10, 64\)"):
        ckpt.load_into(model, wrong, prefix="language_model.", strict=False)
    with pytest.raises(KeyError, match="language_model"):
        ckpt.load_into(model, state, prefix="llm.")
    extra.pop("language_model.model.layers.2.mlp_moe_gen.up_proj.weight")
    report = ckpt.load_into(model, extra, prefix="language_model.", strict=False)
    assert report.missing == ["model.layers.2.mlp_moe_gen.up_proj.weight"]
    assert report.unexpected == ["model.layers.0.self_attn.rotary.inv_freq"]


def test_sharded_index_and_dir_preference(cfg, tmp_path):
    state = bagel_state(cfg)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        ckpt.save_state_dict(tmp_path / name, {k: state[k] for k in ks})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = ckpt.load_state_dict_dir(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in keys)
    # ema.safetensors wins over the shards once present
    ckpt.save_state_dict(tmp_path / "ema.safetensors", {"only": torch.ones(2)})
    assert list(ckpt.load_state_dict_dir(tmp_path)) == ["only"]
    (tmp_path / sorted(shards)[1]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt.load_state_dict_dir(tmp_path / "model.safetensors.index.json")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("no weights here")
    with pytest.raises(FileNotFoundError, match="cannot tell"):
        ckpt.load_state_dict_dir(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_state_dict_dir(tmp_path / "does_not_exist")


def test_save_handles_shared_and_strided_tensors(tmp_path):
    w = torch.randn(4, 6)
    state = {"a": w, "tied": w, "view": w[:, 1:3], "t": w.t()}
    ckpt.save_state_dict(tmp_path / "x.safetensors", state)
    back = ckpt.load_state_dict_dir(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_meta_model_and_dtype_load(cfg):
    state = bagel_state(cfg)
    with torch.device("meta"):
        meta = MoTForCausalLM(cfg)
    ckpt.load_into(meta, state, prefix="language_model.", dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in meta.parameters())
    ref = MoTForCausalLM(cfg)
    ckpt.load_into(ref, state, prefix="language_model.")
    layout = PackedLayout.build([DETECTION])
    x = embeds(layout, cfg).float()
    torch.testing.assert_close(meta(x.bfloat16(), layout).last_hidden_state.float(),
                               ref(x, layout).last_hidden_state, atol=0.1, rtol=0.05)


def test_model_has_exactly_bagels_keys(cfg):
    want = {k[len("language_model."):] for k in bagel_state(cfg) if k.startswith("language_model.")}
    assert set(MoTForCausalLM(cfg).state_dict()) == want
    assert set(MoTModel(cfg).state_dict()) == {k[len("model."):] for k in want if k.startswith("model.")}
