"""transformers as an oracle for the MoT text path (issue 17): with only text tokens, everything
runs through the understanding expert, which is a Qwen2 decoder with per-head q/k RMSNorms
(BAGEL's ``qk_norm``) and q/k/v biases.

The closest transformers model is ``Qwen3ForCausalLM(attention_bias=True)``: Qwen3 has the
per-head q/k RMSNorm (on head_dim, before RoPE, like ours), SwiGLU, half-split RoPE and an untied
``lm_head``, but its ``attention_bias`` also gives ``o_proj`` a bias that BAGEL/Qwen2 lacks — the
oracle's ``o_proj.bias`` is zeroed, and then the two are the same function. (``Qwen2ForCausalLM``
has the right biases but no q/k norms.) Keys map one-to-one: HF's ``model.*`` / ``lm_head.*`` are
our understanding expert's keys, so a BAGEL ``language_model.*`` state dict needs no renaming.

The tiny config is deliberately off-default where a hard-coded value could hide: GQA (4 query
heads on 2 KV heads), head_dim ≠ hidden / heads, rope θ 5e4, RMS eps 1e-5; every norm weight and
bias is random, so dropping or swapping any of them changes the output.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

# Skip only when absent: an installed but broken transformers (e.g. a missing dependency)
# must fail here, not turn into a silent skip as importorskip would.
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install -e .[dev])", allow_module_level=True)
import transformers  # noqa: E402

from aigid.models.unigendet.mot import KVCache, MoTConfig, MoTForCausalLM  # noqa: E402
from aigid.ops.packing import PackedLayout, Split  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
             intermediate_size=40, vocab_size=61, rope_theta=5e4, rms_eps=1e-5)
BACKENDS = ["reference", "sdpa"]   # both CPU paths of aigid.ops.packed_attention
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, MoTForCausalLM]:
    """(HF Qwen3 oracle, our MoT) with the same random weights, fp32, eval mode."""
    s = SIZES
    hf_cfg = transformers.Qwen3Config(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"], rope_theta=s["rope_theta"],
        rms_norm_eps=s["rms_eps"], attention_bias=True, tie_word_embeddings=False,
        use_sliding_window=False, max_position_embeddings=256)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("o_proj.bias"):
                p.zero_()                            # BAGEL's o_proj has no bias
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    ours = MoTForCausalLM(MoTConfig(**s, max_position=256)).float().eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    # Only the generation expert is absent from a text model; only o_proj.bias (zero) is extra.
    assert all("_moe_gen" in k for k in missing), missing
    assert missing, "the generation expert's keys should be missing"
    assert sorted(unexpected) == sorted(f"model.layers.{i}.self_attn.o_proj.bias"
                                        for i in range(s["num_layers"])), unexpected
    return hf, ours


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def _ours_logits(ours: MoTForCausalLM, ids: torch.Tensor, samples, backend: str) -> torch.Tensor:
    layout = PackedLayout.build(samples)
    with torch.no_grad():
        out = ours(ours.model.embed_tokens(ids), layout, attention_backend=backend)
        return ours.logits(out.last_hidden_state)


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_text_sample_matches_qwen3(pair, backend):
    """Catches any drift of the understanding expert from a Qwen2+qk_norm decoder: a dropped or
    misplaced q/k norm (e.g. after RoPE), swapped RoPE halves or interleaved RoPE, a hard-coded
    θ or eps, a wrong GQA head mapping (repeat vs tile of KV heads), head_dim taken as
    hidden/heads, a missing q/k/v bias, the wrong final norm or a tied lm_head."""
    hf, ours = pair
    ids = _ids(19, seed=1)
    torch.testing.assert_close(_ours_logits(ours, ids, [[Split(19, "text")]], backend),
                               _hf_logits(hf, ids), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_samples_equal_each_alone(pair, backend):
    """Catches attention leaking across packed samples (a later sample reading an earlier one's
    tokens) and a text sample cut into two text splits not behaving as one causal run. (Position
    ids that fail to restart per sample are invisible here — RoPE scores depend only on relative
    positions within a text-only sample — so the cached-decoding test below covers them.)"""
    hf, ours = pair
    a, b, c = _ids(11, seed=2), _ids(7, seed=3), _ids(9, seed=4)
    samples = [[Split(11, "text")], [Split(7, "text")], [Split(4, "text"), Split(5, "text")]]
    got = _ours_logits(ours, torch.cat([a, b, c]), samples, backend)
    want = torch.cat([_hf_logits(hf, a), _hf_logits(hf, b), _hf_logits(hf, c)])
    torch.testing.assert_close(got, want, **TOL)


def test_cached_decoding_matches_qwen3(pair):
    """Catches a decode step that differs from the full forward pass of the same tokens: the new
    token's RoPE id off by one, prefill position ids that do not restart per sample (the decoded
    token's id no longer fits its cached keys), its K/V not appended before attending, or a
    shorter sample's cache padding being read."""
    hf, ours = pair
    prompts, nxt = [_ids(8, seed=5), _ids(5, seed=6)], _ids(2, seed=7)
    cache = KVCache(reserve=2)
    layout = PackedLayout.build([[Split(len(p), "text")] for p in prompts])
    with torch.no_grad():
        ours(ours.model.embed_tokens(torch.cat(prompts)), layout, kv_cache=cache)
        pos = torch.tensor([len(p) for p in prompts])
        got = ours.logits(ours.model.decode_step(ours.model.embed_tokens(nxt), pos, cache))
    want = torch.stack([_hf_logits(hf, torch.cat([p, nxt[i:i + 1]]))[-1] for i, p in enumerate(prompts)])
    torch.testing.assert_close(got, want, **TOL)
