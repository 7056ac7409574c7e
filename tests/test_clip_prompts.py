"""Deep multimodal prompts: only prompts train; slots are replaced per layer; shapes vary."""
import pytest
import torch

from aigid.models.mirage import MiraGe


def _model(cfg, tokens, depth):
    cfg.prompt_tokens, cfg.prompt_depth = tokens, depth
    return MiraGe(cfg)


def test_only_prompts_and_couplings_are_trainable(tiny_config):
    m = _model(tiny_config, 2, 3)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"prompts.text"} | {f"prompts.to_vision.{i}.{w}" for i in range(3) for w in ("weight", "bias")}
    assert all(not p.requires_grad for p in m.clip.parameters())
    assert m.prompts.text.shape == (3, 2, 64)


@pytest.mark.parametrize("tokens,depth", [(1, 1), (2, 3), (3, 4), (2, 4)])
def test_towers_run_and_backprop_for_b_and_l(tiny_config, tokens, depth):
    m = _model(tiny_config, tokens, depth)
    out = m(torch.randn(3, 3, 32, 32))
    assert out["logits"].shape == (3, 2) and out["anchors"].shape == (2, 64)
    out["logits"].sum().backward()
    assert m.prompts.text.grad is not None and m.prompts.text.grad.abs().sum() > 0
    for f in m.prompts.to_vision:
        assert f.weight.grad.abs().sum() > 0


def test_depth_beyond_tower_raises(tiny_config):
    m = _model(tiny_config, 2, 5)  # the tiny towers have 4 layers
    with pytest.raises(ValueError, match="exceeds"):
        m(torch.randn(1, 3, 32, 32))


def _block_inputs(tower_blocks):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].detach().clone()),
                                         with_kwargs=True) for b in tower_blocks]
    return seen, hooks


def test_vision_prompts_replace_not_accumulate(tiny_config):
    m = _model(tiny_config, 2, 3)
    seen, hooks = _block_inputs(m.clip.visual.transformer.resblocks)
    m.embed_images(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    vision_prompts = m.prompts.vision().detach()
    n_tokens = 1 + 16 + 2  # cls + 4x4 patches + B prompts, the same at every layer
    assert [x.shape[1] for x in seen] == [n_tokens] * 4
    with torch.no_grad():  # layer 0: v_0 went in before ln_pre, as in MaPLe
        first = m.clip.visual.ln_pre(vision_prompts[0])
    torch.testing.assert_close(seen[0][:, -2:], first.expand(2, -1, -1))
    for i in (1, 2):  # deeper blocks see exactly F_i(θ_i) in the prompt slots
        torch.testing.assert_close(seen[i][:, -2:], vision_prompts[i].expand(2, -1, -1))
    assert not torch.allclose(seen[3][:, -2:], vision_prompts[2].expand(2, -1, -1))  # layer 4: no new prompt


def test_text_prompts_replace_not_accumulate(tiny_config):
    m = _model(tiny_config, 2, 3)
    seen, hooks = _block_inputs(m.clip.transformer.resblocks)
    m.anchors()
    for h in hooks:
        h.remove()
    assert [x.shape[1] for x in seen] == [16] * 4  # context length never grows
    text = m.prompts.text.detach()
    pos = m.clip.positional_embedding.detach()
    torch.testing.assert_close(seen[0][:, 1:3], (text[0] + pos[1:3]).expand(2, -1, -1))
    for i in (1, 2):  # deeper prompts are written as they are, right after SOS
        torch.testing.assert_close(seen[i][:, 1:3], text[i].expand(2, -1, -1))


def test_each_layers_prompt_changes_the_output(tiny_config):
    m = _model(tiny_config, 2, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base_h, base_e = m.embed_images(x), m.anchors()
        for layer in range(3):
            saved = m.prompts.text[layer].clone()
            m.prompts.text[layer] += 0.5
            assert not torch.allclose(m.embed_images(x), base_h)
            assert not torch.allclose(m.anchors(), base_e)
            m.prompts.text[layer] = saved
