"""transformers as an oracle for aigid's SigLIP vision tower (issue 17).

``SigLIPVisionModel`` keeps Hugging Face's SigLIP key names under ``vision_model.*`` (UniGenDet
nests it as ``vit_model``), so a ``transformers.SiglipVisionModel`` state dict maps in by name
alone: prefix ``vision_model.`` (transformers 5 writes its keys without it; SigLIP checkpoints on
the Hub and BAGEL's release have it), drop the attention-pooling ``head.*`` (BAGEL builds SigLIP
with ``vision_use_head=False``), and — as BAGEL does with so400m's 27 layers — keep only the
first ``num_layers`` encoder layers (BAGEL uses 26, ``post_layernorm`` still applied on top).

Comparable only at the native grid (``image_size / patch_size`` per side): off it, transformers
bicubically resizes the whole position table (``interpolate_pos_encoding=True``) while BAGEL and
aigid take the top-left ``h × w`` block of the table (extrapolating ids ``row·side + col``), so
the two differ there by design.
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

from aigid.models.unigendet.siglip import SigLIPConfig, SigLIPVisionModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny but off-default: non-square patches are impossible in SigLIP, so a 6 × 6 grid of 4-px
# patches; 4 heads of 8; LayerNorm eps 1e-3 (SigLIP's is 1e-6) so that a hard-coded eps moves
# the tokens by more than the tolerance (1e-5 vs 1e-6 would hide inside it).
SIZES = dict(hidden_size=32, intermediate_size=40, num_heads=4, image_size=24, patch_size=4,
             layer_norm_eps=1e-3)
LAYERS = 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _hf_siglip(num_layers: int) -> torch.nn.Module:
    cfg = transformers.SiglipVisionConfig(
        hidden_size=SIZES["hidden_size"], intermediate_size=SIZES["intermediate_size"],
        num_hidden_layers=num_layers, num_attention_heads=SIZES["num_heads"],
        image_size=SIZES["image_size"], patch_size=SIZES["patch_size"], num_channels=3,
        layer_norm_eps=SIZES["layer_norm_eps"], hidden_act="gelu_pytorch_tanh", vision_use_head=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(cfg).float().eval()
    with torch.no_grad():  # random LayerNorm affines too, so swapping or dropping one shows
        for name, p in model.named_parameters():
            p.copy_((1 if "norm" in name and name.endswith("weight") else 0) + 0.2 * torch.randn_like(p))
    return model


def _to_ours(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF SigLIP keys → ours (BAGEL's): ``vision_model.`` prefix, no head, first layers only."""
    out = {}
    for key, value in hf_state.items():
        key = "vision_model." + key.removeprefix("vision_model.")
        if key.startswith("vision_model.head.") or key.endswith("position_ids"):
            continue
        if key.startswith("vision_model.encoder.layers.") and int(key.split(".")[3]) >= num_layers:
            continue
        out[key] = value
    return out


def _ours(num_layers: int, state: dict[str, torch.Tensor]) -> SigLIPVisionModel:
    model = SigLIPVisionModel(SigLIPConfig(num_layers=num_layers, **SIZES)).float().eval()
    model.load_state_dict(state, strict=True)
    return model


def _pixels(n: int = 2) -> torch.Tensor:
    side = SIZES["image_size"]
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def test_tokens_match_hf_last_hidden_state():
    """Catches any drift from SigLIP's encoder at the native grid: pre-norm order, a plain-erf
    GELU instead of gelu-tanh, a hard-coded LayerNorm eps, the attention scale, a transposed or
    column-major patch flattening, position ids other than ``row·side + col``, or a missing
    post_layernorm (HF's ``last_hidden_state`` is after it)."""
    hf = _hf_siglip(LAYERS)
    ours = _ours(LAYERS, _to_ours(hf.state_dict(), LAYERS))
    x = _pixels()
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        got, ids = ours(x)
    side = SIZES["image_size"] // SIZES["patch_size"]
    assert torch.equal(ids, torch.arange(side * side))  # native grid: the whole table, in order
    torch.testing.assert_close(got, want, **TOL)


def test_bagel_truncation_drops_the_last_layer():
    """Catches a loader or config that keeps SigLIP's last layer (BAGEL builds so400m with 26 of
    its 27 layers, then post_layernorm) or applies post_layernorm to the wrong layer's output."""
    hf = _hf_siglip(LAYERS + 1)
    ours = _ours(LAYERS, _to_ours(hf.state_dict(), LAYERS))
    x = _pixels()
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        post_ln = getattr(hf, "vision_model", hf).post_layernorm
        want = post_ln(out.hidden_states[LAYERS])       # hidden_states[0] is the embeddings
        got, _ = ours(x)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, out.last_hidden_state, atol=1e-3)  # the dropped layer mattered


def test_bagel_linear_patch_weight_matches_hf_conv():
    """Catches a wrong reshape of BAGEL's Linear patch weight (flattened channel-last,
    (p_h, p_w, C), by BAGEL's ``convert_conv2d_to_linear``) into the Conv2d: a channel-first or
    (p_w, p_h) order would give other tokens than HF's conv."""
    hf = _hf_siglip(LAYERS)
    state = _to_ours(hf.state_dict(), LAYERS)
    key = "vision_model.embeddings.patch_embedding.weight"
    conv = state[key]
    state[key] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)  # BAGEL's layout
    ours = _ours(LAYERS, state)
    x = _pixels(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(pixel_values=x).last_hidden_state, **TOL)
