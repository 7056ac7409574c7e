"""BAGEL's Mixture-of-Transformers language backbone (Qwen2 layout, two experts per layer).

One flat packed sequence of T tokens (text, SigLIP ViT tokens, VAE latent tokens of several
samples; see :mod:`aigid.packing`) runs through every layer. Each layer has two experts with their
own weights — the *understanding* expert for text + ViT tokens and the *generation* expert
(``*_moe_gen``) for VAE tokens — and one shared attention over the whole pack
(:func:`aigid.ops.packed_attention`: samples isolated, text causal, image splits full, hidden
noisy latents invisible). Tokens are routed with ``layout.und_index`` / ``layout.gen_index``
(``index_select`` in, ``index_copy_`` out); an expert with no tokens is skipped.

Per expert and layer (BAGEL / Qwen2, pre-norm):
``h = x + o_proj(attn(rope(q_norm(q_proj(n1(x)))), rope(k_norm(k_proj(n1(x)))), v_proj(n1(x))))``
then ``x' = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))`` with RMSNorms n1/n2.

Module and key names mirror BAGEL's ``language_model`` so released checkpoints
(``ema.safetensors``) load unchanged — under the prefix ``language_model.``:

* ``model.embed_tokens.weight``                               (vocab, H)
* ``model.layers.{i}.self_attn.{q,k,v}_proj[_moe_gen].{weight,bias}``  (q: (Hq·d, H); k/v: (Hkv·d, H))
* ``model.layers.{i}.self_attn.o_proj[_moe_gen].weight``      (H, Hq·d), no bias
* ``model.layers.{i}.self_attn.{q,k}_norm[_moe_gen].weight``  (d,) per-head RMSNorm (qk_norm)
* ``model.layers.{i}.mlp[_moe_gen].{gate,up,down}_proj.weight``  SwiGLU, no bias
* ``model.layers.{i}.{input,post_attention}_layernorm[_moe_gen].weight``  (H,)
* ``model.norm.weight``, ``model.norm_moe_gen.weight``        final norms per expert
* ``lm_head.weight``                                          (vocab, H), untied

The rotary embedding (``model.rotary``) has no persistent state, like BAGEL's.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aigid import ops
from aigid.models.unigendet.rope import RMSNorm, RotaryEmbedding, apply_rotary
from aigid.packing import PackedLayout

__all__ = ["MoTConfig", "MoTAttention", "MoTMLP", "MoTLayer", "MoTModel", "MoTOutput", "MoTForCausalLM"]

EXPERTS = ("", "_moe_gen")  # key suffix of the understanding and the generation expert


@dataclass
class MoTConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    qk_norm: bool = True
    max_position: int = 32768
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoTConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def named(cls, name: str) -> "MoTConfig":
        """A shipped config: ``tiny`` (tests) or ``bagel-7b`` (files aigid/models/configs/mot-*.json)."""
        path = resources.files("aigid.models") / "configs" / f"mot-{name}.json"
        if not path.is_file():
            raise ValueError(f"no shipped MoT config {name!r} (tiny, bagel-7b)")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MoTConfig keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_qwen2(cls, d: dict[str, Any]) -> "MoTConfig":
        """From a Hugging Face Qwen2 config dict (BAGEL's ``llm_config.json``)."""
        heads = d["num_attention_heads"]
        return cls(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=d.get("num_key_value_heads", heads),
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                   rope_theta=float(d.get("rope_theta", 1e6)), rms_eps=float(d.get("rms_norm_eps", 1e-6)),
                   qk_norm=bool(d.get("qk_norm", True)),
                   max_position=d.get("max_position_embeddings", 32768),
                   initializer_range=float(d.get("initializer_range", 0.02)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MoTOutput:
    last_hidden_state: torch.Tensor                     # (T, H), final norm per expert
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # raw layer outputs


# ---------------------------------------------------------------------------------------------
# Routing between the packed sequence and the experts
# ---------------------------------------------------------------------------------------------

def _route(x: torch.Tensor, layout: PackedLayout) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(understanding tokens, generation tokens) of the packed ``x``; None for an empty expert.
    Index tensors are ascending, so a lone expert's tokens are ``x`` itself (no copy)."""
    if layout.gen_index.numel() == 0:
        return x, None
    if layout.und_index.numel() == 0:
        return None, x
    return x.index_select(0, layout.und_index), x.index_select(0, layout.gen_index)


def _merge(und: Optional[torch.Tensor], gen: Optional[torch.Tensor], layout: PackedLayout) -> torch.Tensor:
    """Inverse of :func:`_route`: the packed tensor from the experts' tokens."""
    if gen is None:
        return und
    if und is None:
        return gen
    out = und.new_empty((layout.total, *und.shape[1:]))
    out.index_copy_(0, layout.und_index, und)
    out.index_copy_(0, layout.gen_index, gen)
    return out


def _per_expert(module: nn.Module, name: str, und, gen):
    """Apply ``module.<name>`` to the understanding tokens and ``module.<name>_moe_gen`` to the
    generation tokens, skipping an empty expert."""
    return (None if und is None else getattr(module, name)(und),
            None if gen is None else getattr(module, name + "_moe_gen")(gen))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class MoTMLP(nn.Module):
    """SwiGLU feed-forward, no biases (Qwen2)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Per-expert q/k/v/o projections and q/k norms around one shared packed attention."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        for sfx in EXPERTS:
            setattr(self, f"q_proj{sfx}", nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=True))
            setattr(self, f"k_proj{sfx}", nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=True))
            setattr(self, f"v_proj{sfx}", nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=True))
            setattr(self, f"o_proj{sfx}", nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False))
            if c.qk_norm:
                setattr(self, f"q_norm{sfx}", RMSNorm(c.head_dim, c.rms_eps))
                setattr(self, f"k_norm{sfx}", RMSNorm(c.head_dim, c.rms_eps))
        self.qk_norm = c.qk_norm

    def _qkv(self, h: Optional[torch.Tensor], sfx: str):
        if h is None:
            return None, None, None
        q = getattr(self, f"q_proj{sfx}")(h).unflatten(-1, (self.num_heads, self.head_dim))
        k = getattr(self, f"k_proj{sfx}")(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = getattr(self, f"v_proj{sfx}")(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = getattr(self, f"q_norm{sfx}")(q), getattr(self, f"k_norm{sfx}")(k)
        return q, k, v

    def forward(self, h_und: Optional[torch.Tensor], h_gen: Optional[torch.Tensor], layout: PackedLayout,
                rope: tuple[torch.Tensor, torch.Tensor], attention_backend=None
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Normed per-expert inputs in, per-expert attention outputs (after o_proj) out.

        ``attention_backend``: a backend name for :func:`aigid.ops.packed_attention`, or a callable
        ``(q (T, H_q, d), k, v (T, H_kv, d), layout) -> (T, H_q, d)`` with the same contract.
        """
        und, gen = self._qkv(h_und, ""), self._qkv(h_gen, "_moe_gen")
        q, k, v = (_merge(a, b, layout) for a, b in zip(und, gen))
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if callable(attention_backend):  # a custom kernel, e.g. flex_attention in the benchmark
            o = attention_backend(q, k, v, layout)
        else:
            o = ops.packed_attention(q, k, v, layout, backend=attention_backend)
        o = o.flatten(1)
        return _per_expert(self, "o_proj", *_route(o, layout))


class MoTLayer(nn.Module):
    """One decoder layer: two experts (``X`` and ``X_moe_gen``) around a shared attention."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        c = config
        self.self_attn = MoTAttention(c)
        for sfx in EXPERTS:
            setattr(self, f"mlp{sfx}", MoTMLP(c.hidden_size, c.intermediate_size))
            setattr(self, f"input_layernorm{sfx}", RMSNorm(c.hidden_size, c.rms_eps))
            setattr(self, f"post_attention_layernorm{sfx}", RMSNorm(c.hidden_size, c.rms_eps))

    def forward(self, x: torch.Tensor, layout: PackedLayout, rope: tuple[torch.Tensor, torch.Tensor],
                attention_backend=None) -> torch.Tensor:
        """x: (T, H) packed hidden states; rope: (cos, sin) each (T, head_dim). Returns (T, H)."""
        x_und, x_gen = _route(x, layout)
        h = _per_expert(self, "input_layernorm", x_und, x_gen)
        a_und, a_gen = self.self_attn(*h, layout, rope, attention_backend)
        x_und = None if x_und is None else x_und + a_und
        x_gen = None if x_gen is None else x_gen + a_gen
        h = _per_expert(self, "post_attention_layernorm", x_und, x_gen)
        m_und, m_gen = _per_expert(self, "mlp", *h)
        x_und = None if x_und is None else x_und + m_und
        x_gen = None if x_gen is None else x_gen + m_gen
        return _merge(x_und, x_gen, layout)


def _init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)


class MoTModel(nn.Module):
    """BAGEL's ``language_model.model``: embed_tokens, layers, norm, norm_moe_gen, rotary."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.apply(functools.partial(_init_weights, std=config.initializer_range))

    def forward(self, inputs_embeds: torch.Tensor, layout: PackedLayout, *,
                return_layers: Sequence[int] = (), attention_backend=None) -> MoTOutput:
        """inputs_embeds: (T, H) in pack order (text embeddings, connector outputs, VAE tokens).

        ``return_layers``: 0-based layer indices whose raw outputs (before any final norm) are
        returned in ``layer_outputs``. With ``gradient_checkpointing`` set and grad enabled, each
        layer is recomputed in backward (``torch.utils.checkpoint``, non-reentrant).
        """
        if not isinstance(layout, PackedLayout):
            raise TypeError(f"layout must be a PackedLayout, got {type(layout).__name__}")
        if inputs_embeds.ndim != 2 or inputs_embeds.shape != (layout.total, self.config.hidden_size):
            raise ValueError(f"inputs_embeds must be (T={layout.total}, H={self.config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        wanted = set()
        for i in return_layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.layers):
                raise ValueError(f"return_layers holds {i!r}; layers are 0..{len(self.layers) - 1}")
            wanted.add(i)
        if layout.device != inputs_embeds.device:
            layout = layout.to(inputs_embeds.device)
        if layout.max_position_id >= self.config.max_position:
            raise ValueError(f"position id {layout.max_position_id} exceeds max_position "
                             f"{self.config.max_position}")
        rope = self.rotary(layout.position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        outputs: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, rope, attention_backend=attention_backend,
                               use_reentrant=False)
            else:
                x = layer(x, layout, rope, attention_backend=attention_backend)
            if i in wanted:
                outputs[i] = x
        final = _merge(*_per_expert(self, "norm", *_route(x, layout)), layout)
        return MoTOutput(final, outputs)


class MoTForCausalLM(nn.Module):
    """BAGEL's ``language_model``: ``model`` (:class:`MoTModel`) and an untied ``lm_head``."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.model = MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _init_weights(self.lm_head, config.initializer_range)

    def forward(self, inputs_embeds: torch.Tensor, layout: PackedLayout, **kwargs) -> MoTOutput:
        """The backbone's output; apply :meth:`logits` to the positions that need them (the full
        (T, vocab) matrix is rarely wanted at 152k vocab)."""
        return self.model(inputs_embeds, layout, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
