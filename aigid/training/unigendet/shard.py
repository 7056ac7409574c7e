"""UniGenDet under torchrun: FSDP2 sharding per layer, loading on the meta device with rank 0
reading the weights, DIGA's teacher as a second sharded model, and rank-0 export in BAGEL's key
names. The training loop (:mod:`aigid.training.unigendet.loop`) calls these; one process never needs them."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Union

import torch
from torch import nn

from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.training import dist as adist
from aigid.training.dist import DistContext
from aigid.training.unigendet.common import EMA

__all__ = ["shard_unigendet", "build_sharded", "build_teacher", "export_pretrained", "is_sharded",
           "is_dtensor", "full_tensor"]

log = logging.getLogger("aigid.training.unigendet")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


# ---- sharding, loading, export ------------------------------------------------------------------
def shard_unigendet(model: UniGenDet, ctx: DistContext, *, bf16: Optional[bool] = None,
                    reshard_after_forward: bool = True) -> UniGenDet:
    """FSDP2 ``fully_shard`` on every SigLIP encoder layer, every MoT decoder layer, ``diga_mlp``,
    then the root (embeddings, heads, norms, connector and the rest), all on ``ctx.mesh`` — hybrid sharding:
    shard within a node, replicate across nodes.

    ``bf16`` (default: on CUDA): bf16 parameters in compute, fp32 gradient reduction, fp32 master
    weights. Forward inputs are not cast by FSDP (``cast_forward_inputs=False``): its tree map
    rebuilds dataclasses through ``__init__`` and ``PackedLayout`` has an ``init=False`` field; the
    model casts its own embeddings to the parameters' dtype and the step runs under autocast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not ctx.distributed:
        raise ValueError("shard_unigendet needs a distributed context (aigid.training.dist.init under torchrun)")
    bf16 = ctx.device.type == "cuda" if bf16 is None else bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy(cast_forward_inputs=False)
    kw = dict(mesh=ctx.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for layer in model.vit_model.vision_model.encoder.layers:
        fully_shard(layer, **kw)
    for layer in model.language_model.model.layers:
        fully_shard(layer, **kw)
    # DIGA calls diga_mlp after the forward: its own unit gathers and reduces around that call.
    fully_shard(model.diga_mlp, **kw)
    fully_shard(model, **kw)
    return model


def _source_config(source: str) -> UniGenDetConfig:
    """The config of a saved UniGenDet folder (config.json) or a BAGEL release folder, without weights."""
    from aigid.models.unigendet.release import release_config
    ours = os.path.join(source, "config.json")
    if os.path.isfile(ours):
        with open(ours) as f:
            raw = json.load(f)
        if raw.get("arch") == "unigendet":
            return UniGenDetConfig.from_dict(raw)
    return release_config(source)


def build_sharded(source: Union[str, os.PathLike], ctx: DistContext, *, bf16: Optional[bool] = None,
                  gradient_checkpointing: bool = False, **load_kw) -> UniGenDet:
    """``UniGenDet.from_pretrained(source, **load_kw)`` for a torchrun job, sharded.

    Every rank builds the model on the meta device and shards it (:func:`shard_unigendet`), then
    allocates only its shards; rank 0 alone reads the weights (``from_pretrained``: one full copy
    in its host RAM) and ``set_model_state_dict(..., full_state_dict=True,
    broadcast_from_rank0=True)`` sends every rank its pieces. (Per node, the plan is the node's
    local rank 0 reading and broadcasting inside the node's shard group; over the cluster file
    system rank 0 broadcasting to all is the simple form used here.) The external VAE is read by
    every rank (small, frozen, replicated). In one process it is ``from_pretrained`` moved to
    ``ctx.device``."""
    source = os.fspath(source)
    if not ctx.distributed:
        model = UniGenDet.from_pretrained(source, **load_kw).to(ctx.device)
        model.gradient_checkpointing = gradient_checkpointing
        return model
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    with torch.device("meta"):
        model = UniGenDet(_source_config(source))
    shard_unigendet(model, ctx, bf16=bf16)
    model.to_empty(device=ctx.device)
    full, heads = {}, [None]
    if ctx.is_main:
        ref = UniGenDet.from_pretrained(source, **load_kw)
        full, heads = ref.state_dict(), [(ref.random_heads, ref.allow_random_heads, ref.source)]
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    tdist.broadcast_object_list(heads, src=0)
    model.random_heads, model.allow_random_heads, model.source = list(heads[0][0]), heads[0][1], heads[0][2]
    vae_file = os.path.join(source, "vae.safetensors")
    if os.path.isfile(vae_file):
        from safetensors.torch import load_file
        model.vae.load_state_dict(load_file(vae_file, device=str(ctx.device)))
    model.gradient_checkpointing = gradient_checkpointing
    return model


def build_teacher(source: Union[str, os.PathLike], ctx: DistContext, **kw) -> UniGenDet:
    """DIGA's teacher: a second model from the same stage-1 weights, frozen, in eval mode and (under
    torchrun) sharded like the student — never a deep copy of a sharded model."""
    teacher = build_sharded(source, ctx, **kw).eval()
    teacher.requires_grad_(False)
    return teacher


def export_pretrained(model: UniGenDet, directory: Union[str, os.PathLike], ctx: Optional[DistContext] = None, *,
                      ema: Optional[EMA] = None, summary: Optional[dict] = None) -> None:
    """Write a ``UniGenDet.from_pretrained`` folder (safetensors, BAGEL's key names) from rank 0.

    Every rank must call it: the full state dict is gathered shard by shard to rank 0's CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), so no GPU holds the whole
    model. ``ema``: write the EMA weights instead of the trained ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    ctx = ctx or adist.single(model.device)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:
        for name, value in ema.shadow.items():
            value = value.full_tensor() if is_dtensor(value) else value
            if ctx.is_main:
                full[name] = value.detach().cpu().to(full[name].dtype)
    if ctx.is_main:
        with torch.device("meta"):
            out = UniGenDet(model.config)
        out.load_state_dict(full, assign=True)
        if model._vae is not None:
            out.__dict__["_vae"] = model._vae
        out.save_pretrained(directory, summary)
    adist.barrier(ctx)
