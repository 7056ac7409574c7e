"""BAGEL's Mixture-of-Transformers language backbone (Qwen2 layout, two experts per layer).

One flat packed sequence of T tokens (text, SigLIP ViT tokens, VAE latent tokens of several
samples; see :mod:`aigid.ops.packing`) runs through every layer. Each layer has two experts with their
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

Cached decoding: ``MoTModel.forward(..., kv_cache=KVCache())`` stores every layer's post-RoPE
keys/values of the pack (the prefill); ``MoTModel.decode_step`` then runs one new text token per
sample through the understanding expert, reading only that sample's cache.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aigid import ops
from aigid.models.configs import shipped_config
from aigid.models.unigendet.rope import RMSNorm, RotaryEmbedding, apply_rotary
from aigid.ops.packing import PackedLayout

__all__ = ["MoTConfig", "MoTAttention", "MoTMLP", "MoTLayer", "MoTModel", "MoTOutput", "MoTForCausalLM",
           "KVCache"]

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
        return cls.from_dict(shipped_config("mot", name))

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
# KV cache for decoding
# ---------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer keys/values of a packed prefill, padded per sample, grown by decoding steps.

    Buffers are (N, H_kv, capacity, d) per layer (samples isolated, each in its own row; row b
    holds sample b's tokens from offset 0, ``lengths[b]`` of them valid). ``reserve`` is the room
    kept after the longest sample at prefill (e.g. ``max_new_tokens``); a step that needs more
    grows every buffer once by at least that much.

    A decoded token of sample b reads every cached token of b. That is the packed attention's rule
    only when b has no hidden split (a hidden split is invisible to later splits), so a prefill
    with one is refused.
    """

    def __init__(self, reserve: int = 0):
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"reserve must be a non-negative int, got {reserve!r}")
        self.reserve = reserve
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []               # valid tokens per sample (host)
        self._lengths_dev: Optional[torch.Tensor] = None
        self._slot: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]] = None

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    # ---- prefill: called by MoTModel.forward, layer by layer -----------------------------------
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> None:
        """Scatter the pack's post-RoPE k/v (T, H_kv, d) of ``layer`` into per-sample rows."""
        if layer != len(self.keys):
            raise RuntimeError(f"KVCache: expected layer {len(self.keys)}, got {layer} (a cache holds "
                               f"one prefill; use a fresh KVCache per pack)")
        if layer == 0:
            hidden = [b for b, sm in enumerate(layout.samples) if any(sp.hidden for sp in sm)]
            if hidden:
                raise ValueError(f"KVCache: samples {hidden} have hidden splits; a decoded token "
                                 f"would read them, which the packed attention forbids")
            self.lengths = layout.sample_lengths
            self._lengths_dev = torch.tensor(self.lengths, dtype=torch.long, device=k.device)
        rows, cols = layout.cached(("kv_slots", k.device), lambda: _kv_slots(layout, k.device))
        n, cap = len(self.lengths), max(self.lengths) + self.reserve
        kb = k.new_zeros(n, k.shape[1], cap, k.shape[2])
        vb = v.new_zeros(n, v.shape[1], cap, v.shape[2])
        kb.transpose(1, 2)[rows, cols] = k   # views: writes land in the (N, H_kv, L, d) buffers
        vb.transpose(1, 2)[rows, cols] = v
        self.keys.append(kb)
        self.values.append(vb)

    # ---- decoding: one token per sample, shared by all layers of a step ------------------------
    def begin_step(self) -> None:
        """Make room for one more token per sample and fix this step's write slot and mask."""
        if not self.keys:
            raise RuntimeError("KVCache is empty: run the prefill (forward with kv_cache=) first")
        need = max(self.lengths) + 1
        cap = self.keys[0].shape[2]
        if need > cap:
            grow = max(need - cap, self.reserve, 16)
            pad = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], grow, x.shape[3])], 2)  # noqa: E731
            self.keys = [pad(x) for x in self.keys]
            self.values = [pad(x) for x in self.values]
        dev = self.keys[0].device
        rows = torch.arange(len(self.lengths), device=dev)
        # Keys past a shorter sample's end are padding; with equal lengths there are none.
        mask = None
        if min(self.lengths) != max(self.lengths):
            mask = (torch.arange(need, device=dev)[None, :] <= self._lengths_dev[:, None])[:, None, None, :]
        self._slot = (rows, self._lengths_dev, mask, need)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
               ) -> torch.Tensor:
        """Append k/v (N, H_kv, d) at each sample's end, then q (N, H_q, d) over its own sample."""
        if self._slot is None:
            raise RuntimeError("KVCache.attend outside a step (call begin_step first)")
        rows, pos, mask, length = self._slot
        kb, vb = self.keys[layer], self.values[layer]
        kb[rows, :, pos] = k.to(kb.dtype)
        vb[rows, :, pos] = v.to(vb.dtype)
        n, h_q, d = q.shape
        h_kv = kb.shape[1]
        # GQA without expanding K/V: the h_q/h_kv query heads of one K/V head become that head's
        # "query rows" (one token each), which every SDPA backend takes, with or without a mask.
        qg = q.to(kb.dtype).reshape(n, h_kv, h_q // h_kv, d)
        o = F.scaled_dot_product_attention(qg, kb[:, :, :length], vb[:, :, :length],
                                           attn_mask=mask, scale=scale)
        return o.reshape(n, h_q, d)

    def end_step(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]
        self._lengths_dev = self._lengths_dev + 1
        self._slot = None


def _kv_slots(layout: PackedLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, offset in sample) of every pack token."""
    cu = layout.cu_seqlens.to(device=device, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(layout.num_samples, device=device), cu.diff())
    return rows, torch.arange(layout.total, device=device) - cu[rows]


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
                rope: tuple[torch.Tensor, torch.Tensor], attention_backend=None,
                kv_sink: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Normed per-expert inputs in, per-expert attention outputs (after o_proj) out.

        ``attention_backend``: a backend name for :func:`aigid.ops.packed_attention`, or a callable
        ``(q (T, H_q, d), k, v (T, H_kv, d), layout) -> (T, H_q, d)`` with the same contract.
        ``kv_sink``: called with the post-RoPE (k, v) of the pack (a KV cache's prefill).
        """
        und, gen = self._qkv(h_und, ""), self._qkv(h_gen, "_moe_gen")
        q, k, v = (_merge(a, b, layout) for a, b in zip(und, gen))
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_sink is not None:
            kv_sink(k, v)
        if callable(attention_backend):  # a custom kernel, e.g. flex_attention in the benchmark
            o = attention_backend(q, k, v, layout)
        else:
            o = ops.packed_attention(q, k, v, layout, backend=attention_backend)
        o = o.flatten(1)
        return _per_expert(self, "o_proj", *_route(o, layout))

    def decode(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: "KVCache",
               layer: int) -> torch.Tensor:
        """One new text token per sample (understanding expert): normed (N, H) in, o_proj out."""
        q, k, v = self._qkv(h, "")
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = cache.attend(layer, q, k, v, self.head_dim ** -0.5)
        return self.o_proj(o.flatten(1))


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
                attention_backend=None, kv_sink=None) -> torch.Tensor:
        """x: (T, H) packed hidden states; rope: (cos, sin) each (T, head_dim). Returns (T, H)."""
        x_und, x_gen = _route(x, layout)
        h = _per_expert(self, "input_layernorm", x_und, x_gen)
        a_und, a_gen = self.self_attn(*h, layout, rope, attention_backend, kv_sink)
        x_und = None if x_und is None else x_und + a_und
        x_gen = None if x_gen is None else x_gen + a_gen
        h = _per_expert(self, "post_attention_layernorm", x_und, x_gen)
        m_und, m_gen = _per_expert(self, "mlp", *h)
        x_und = None if x_und is None else x_und + m_und
        x_gen = None if x_gen is None else x_gen + m_gen
        return _merge(x_und, x_gen, layout)

    def decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: "KVCache",
               layer: int) -> torch.Tensor:
        """(N, H) new text tokens through the understanding expert of this layer."""
        x = x + self.self_attn.decode(self.input_layernorm(x), rope, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


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
                return_layers: Sequence[int] = (), attention_backend=None,
                kv_cache: Optional[KVCache] = None) -> MoTOutput:
        """inputs_embeds: (T, H) in pack order (text embeddings, connector outputs, VAE tokens).

        ``return_layers``: 0-based layer indices whose raw outputs (before any final norm) are
        returned in ``layer_outputs``. With ``gradient_checkpointing`` set and grad enabled, each
        layer is recomputed in backward (``torch.utils.checkpoint``, non-reentrant).
        ``kv_cache``: a fresh :class:`KVCache` that receives every layer's post-RoPE keys/values
        (outputs unchanged; continue with :meth:`decode_step`).
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
            if kv_cache is not None:  # a prefill for decoding: no checkpointing
                x = layer(x, layout, rope, attention_backend=attention_backend,
                          kv_sink=functools.partial(kv_cache.store, i, layout=layout))
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, rope, attention_backend=attention_backend,
                               use_reentrant=False)
            else:
                x = layer(x, layout, rope, attention_backend=attention_backend)
            if i in wanted:
                outputs[i] = x
        final = _merge(*_per_expert(self, "norm", *_route(x, layout)), layout)
        return MoTOutput(final, outputs)

    def decode_step(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                    kv_cache: KVCache) -> torch.Tensor:
        """One new text token per sample of the cached pack, through every layer.

        inputs_embeds: (N, H) token embeddings, one per sample in pack order (answer text: the
        understanding expert); position_ids: (N,) their RoPE ids (a sample's next id). Each token
        attends to its own sample's cache plus itself, and its k/v are appended. Returns the
        final-normed hidden states (N, H).
        """
        n, hidden = kv_cache.num_samples, self.config.hidden_size
        if kv_cache.num_layers == 0:
            raise RuntimeError("kv_cache is empty: run the prefill (forward with kv_cache=) first")
        if kv_cache.num_layers != len(self.layers):
            raise ValueError(f"kv_cache holds {kv_cache.num_layers} layers, the model has "
                             f"{len(self.layers)} (run forward with kv_cache= first)")
        if inputs_embeds.shape != (n, hidden):
            raise ValueError(f"inputs_embeds must be (N={n}, H={hidden}), got {tuple(inputs_embeds.shape)}")
        if position_ids.shape != (n,) or position_ids.is_floating_point():
            raise ValueError(f"position_ids must be ({n},) integers, got {tuple(position_ids.shape)} "
                             f"{position_ids.dtype}")
        position_ids = position_ids.to(inputs_embeds.device)
        if int(position_ids.max()) >= self.config.max_position:
            raise ValueError(f"position id {int(position_ids.max())} exceeds max_position "
                             f"{self.config.max_position}")
        rope = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        kv_cache.begin_step()
        for i, layer in enumerate(self.layers):
            x = layer.decode(x, rope, kv_cache, i)
        kv_cache.end_step()
        return self.norm(x)


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
