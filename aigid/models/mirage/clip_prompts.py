"""MaPLe-style deep multimodal prompts on open_clip's text and vision transformers.

Following MaPLe (Khattak et al., CVPR 2023; upstream ``clip/model.py`` VisionTransformer_MaPLe and
ResidualAttentionBlock_MaPLe, ``trainers/maple.py`` MultiModalPromptLearner), as MiraGe does:
- B learnable text tokens θ_i per layer for the first L layers (MiraGe: B=2, L=9). At layer 0
  they replace the token embeddings of positions 1..B (right after SOS) of the class prompt
  ("X X Real." with random init; "a photo of a Real." when initialised from words, the first B
  positions "a photo" learned) before the positional embedding is added; at layers 1..L-1 they
  replace the previous layer's prompt outputs at those positions — replaced, never accumulated.
- Vision prompts are coupled: v_i = F_i(θ_i) with a linear F_i (text width → vision width), one
  per layer. v_0 is appended after the patch tokens once the positional embedding is added and
  *before* ``ln_pre``, so ln_pre normalises it as MaPLe does; v_1..v_{L-1} replace the prompt
  slots (the last B tokens) raw, before blocks 1..L-1. Prompts are dropped before pooling.
The CLIP backbone is frozen; only θ and the F_i train.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from open_clip.transformer import text_global_pool


class DeepPrompts(nn.Module):
    """θ ∈ R^{L×B×W_text} and the couplings F_i: R^{W_text} → R^{W_vision}."""

    def __init__(self, n_tokens: int, depth: int, text_width: int, vision_width: int,
                 init_std: float = 0.02):
        super().__init__()
        if n_tokens < 1 or depth < 1:
            raise ValueError(f"need at least one prompt token and one layer (got B={n_tokens}, L={depth})")
        self.n_tokens, self.depth = n_tokens, depth
        self.text = nn.Parameter(torch.randn(depth, n_tokens, text_width) * init_std)
        self.to_vision = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(depth))

    def vision(self) -> torch.Tensor:
        """(L, B, W_vision): each layer's vision prompts, mapped from that layer's text prompts."""
        return torch.stack([f(self.text[i]) for i, f in enumerate(self.to_vision)])


def _blocks(transformer: nn.Module):
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no resblocks: deep prompts need an "
                        "open_clip Transformer tower (ViT vision tower, CLIP text tower)")
    return blocks


def _run_blocks(transformer, x, prompts, place, attn_mask=None):
    """Run the blocks, writing ``prompts[i]`` into the prompt slots before block i (i ≥ 1)."""
    batch_first = getattr(transformer, "batch_first", True)
    blocks = _blocks(transformer)
    if len(prompts) > len(blocks):
        raise ValueError(f"prompt depth {len(prompts)} exceeds the tower's {len(blocks)} layers")
    for i, block in enumerate(blocks):
        if 0 < i < len(prompts):
            x = place(x, prompts[i])
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


class PromptedTextEncoder(nn.Module):
    """Encodes fixed class prompts "<context> <name>." through the prompted CLIP text tower.

    ``context`` is None for random init ("X … X", B placeholders, as MaPLe without ctx_init) or
    words whose first B tokens θ_0 starts from (MaPLe's ctx_init, e.g. "a photo of a"); either way
    positions 1..B of every class prompt are the layer-0 prompt slots.
    """

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], n_tokens: int,
                 context: Optional[str] = None):
        super().__init__()
        text = getattr(clip, "text", clip)  # CustomTextCLIP keeps the tower in .text
        if getattr(text, "cls_emb", None) is not None:
            raise TypeError("text towers with an appended class token (CoCa) are not supported")
        self.clip = [clip]  # a list hides the frozen backbone from this module's parameters
        self.text = [text]
        self.n_tokens = n_tokens
        if context is None:
            context = " ".join(["X"] * n_tokens)
        else:
            # MaPLe (trainers/maple.py) tokenises ctx_init alone and keeps tokens 1..B; the BPE
            # splits on words, so these are also the first B tokens of every class prompt.
            words = tokenizer([context])[0]
            n_words = int((words != 0).sum()) - 2  # CLIP's tokenizer pads with 0; minus SOS, EOS
            if n_words < n_tokens:
                raise ValueError(f"prompt_init {context!r} has {n_words} tokens; it needs at least "
                                 f"prompt_tokens={n_tokens} to initialise them")
            self.register_buffer("context_ids", words[1: 1 + n_tokens], persistent=False)
        self.context = context
        ids = tokenizer([f"{context} {name}." for name in class_names])
        self.register_buffer("token_ids", ids, persistent=False)

    @torch.no_grad()
    def context_embeddings(self) -> torch.Tensor:
        """(B, W_text): the token embeddings of the context's first B tokens (init for θ_0)."""
        if not hasattr(self, "context_ids"):
            raise ValueError("random prompt init has no context words")
        return self.text[0].token_embedding(self.context_ids).detach().clone()

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        """prompts: (L, B, W_text) → class embeddings (C, E), not normalised."""
        text, ids, b = self.text[0], self.token_ids, self.n_tokens
        n = ids.shape[0]
        dtype = text.transformer.get_cast_dtype()
        x = text.token_embedding(ids).to(dtype)
        x = torch.cat([x[:, :1], prompts[0].to(dtype).expand(n, -1, -1), x[:, 1 + b:]], dim=1)
        x = x + text.positional_embedding[: x.shape[1]].to(dtype)

        def place(h, p):
            return torch.cat([h[:, :1], p.to(h.dtype).expand(h.shape[0], -1, -1), h[:, 1 + b:]], dim=1)

        mask = text.attn_mask
        mask = mask[: x.shape[1], : x.shape[1]] if mask is not None else None
        x = _run_blocks(text.transformer, x, prompts, place, attn_mask=mask)
        x = text.ln_final(x)
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        eos = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        pooled = text_global_pool(x, ids, pool, eos_token_id=eos)
        proj = text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


class PromptedVisionEncoder(nn.Module):
    """Runs an open_clip ``VisionTransformer`` with B vision prompts in its first L layers."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        visual = clip.visual
        if not hasattr(visual, "_embeds") or not hasattr(visual, "_pool"):
            raise TypeError(f"{type(visual).__name__} is not an open_clip VisionTransformer; "
                            "deep prompts need a ViT image tower")
        self.visual = [visual]

    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W); prompts: (L, B, W_vision) → image embeddings (N, E)."""
        visual = self.visual[0]
        b = prompts.shape[1]
        # open_clip's _embeds = conv1 → [cls; patches] + positional → patch_dropout → ln_pre.
        # MaPLe appends v_0 before ln_pre. ln_pre normalises each token on its own (LayerNorm over
        # the width), so ln_pre([x; v_0]) == [ln_pre(x); ln_pre(v_0)]: we keep open_clip's own
        # _embeds (patch dropout included, which must never drop a prompt) and pass v_0 through
        # the same ln_pre, instead of re-implementing the patch embedding.
        x = visual._embeds(images)
        first = visual.ln_pre(prompts[0].to(x.dtype))
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)

        def place(h, p):
            return torch.cat([h[:, :-b], p.to(h.dtype).expand(h.shape[0], -1, -1)], dim=1)

        x = _run_blocks(visual.transformer, x, prompts, place)
        pooled, _ = visual._pool(x[:, :-b])
        return pooled @ visual.proj if visual.proj is not None else pooled
