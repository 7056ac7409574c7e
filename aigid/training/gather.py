"""Small helpers for MiraGe's data-parallel training (``torchrun … aigid train``).

Each rank embeds its slice of the global batch; :func:`gather_rows` concatenates every rank's
rows in rank order, so the losses (CE and SupCon over batch ∪ anchors ∪ bank) and the bank push
see the global batch exactly as one process would. Its backward sums the pool's gradient over
ranks and hands each rank its own rows' share (what ``torch.distributed.nn.functional.all_gather``
does, but for slices of unequal size, and with an ``all_reduce``, which every backend has).

Why the step then equals one process's with the global batch: every rank computes the same
global loss L, so the summed gradient of a rank's rows is N·∂L/∂rows, while the anchors (built
from the prompts identically on every rank, not gathered) carry ∂L once. :func:`average_gradients`
(DDP's mean over ranks, in one all_reduce: only the prompts train) turns the first into the
rows' share of ∇L, summed over ranks, and leaves the second as it is.
"""
from __future__ import annotations

import logging
import os
import pickle
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_from_env", "rank_and_world", "rank_slice", "gather_rows", "gatherer",
           "average_gradients", "broadcast_module", "from_rank0", "any_rank", "all_gather_objects"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1),
    unless one is already initialised: NCCL for CUDA, gloo for CPU. True when this call created
    it (the caller then destroys it)."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # Rank 0 alone writes checkpoints, and writes and evaluates the detector at the end, while
    # the others wait in a collective: allow it more than NCCL's default 10 minutes.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    logger.info("aigid train: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(),
                dist.get_backend())
    return True


def rank_slice(keys: list[T], rank: int, world: int) -> list[T]:
    """This rank's contiguous share of one global batch: equal shares when ``len(keys)`` divides
    by ``world``, else the first ranks get one more. Concatenated in rank order they are
    ``keys`` again, which is what makes the gathered batch the single-process batch."""
    n, extra = divmod(len(keys), world)
    start = rank * n + min(rank, extra)
    return keys[start:start + n + (rank < extra)]


class _GatherRows(torch.autograd.Function):
    """All-gather of (n_r, …) rows with autograd; ``sizes[r]`` is rank r's row count."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: tuple[int, ...], group: Any) -> torch.Tensor:
        rank, most = dist.get_rank(group), max(sizes)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local  # all_gather needs one shape on every rank
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.sizes, ctx.group, ctx.start = sizes, group, sum(sizes[:rank])
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        # Every rank's loss may depend on this rank's rows: sum the pool's gradient over ranks
        # and keep our rows (a reduce-scatter, written as an all_reduce: cheap, rows × (E + C)).
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        n = ctx.sizes[dist.get_rank(ctx.group)]
        return total[ctx.start:ctx.start + n], None, None


def gather_rows(local: torch.Tensor, sizes: Iterable[int], group: Any = None) -> torch.Tensor:
    """Every rank's rows, in rank order (``sizes``: each rank's row count, known to all ranks).

    Differentiable: the backward is a collective, so every rank must backpropagate through each
    gather, in the same order, and ``local`` must be part of the graph even with 0 rows. Integer
    tensors (labels) go through without a graph."""
    sizes = tuple(int(s) for s in sizes)
    if local.shape[0] != sizes[dist.get_rank(group)]:
        raise ValueError(f"this rank has {local.shape[0]} rows, sizes says {sizes}")
    return _GatherRows.apply(local, sizes, group)


def gatherer(sizes: Iterable[int], group: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``gather_rows`` with this step's ``sizes`` bound: what ``MiraGe.training_loss`` takes."""
    sizes = tuple(sizes)
    return lambda local: gather_rows(local, sizes, group)


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], group: Any = None) -> None:
    """Mean of the gradients over ranks, in one all_reduce of the flattened gradients (only the
    prompts train: a few MB). A parameter that got no gradient here (a rank whose slice held no
    readable image never runs the vision tower) counts as zeros."""
    world = dist.get_world_size(group)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


@torch.no_grad()
def broadcast_module(module: nn.Module, group: Any = None) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP does when it wraps a model): a
    backbone initialised or loaded differently on one rank cannot silently split the run."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0, group=group)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (e.g. a Ctrl-C that reached one rank
    first): ranks that decide alike stay in step. Without a process group, ``flag``."""
    _, world = rank_and_world()
    if world == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, obj)
    return every


def from_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only (folder checks, checkpoint reads and writes, the detector) and
    give every rank its result, or raise its error everywhere (an error that does not survive
    pickling becomes a RuntimeError with its message), so that no rank waits for one that
    failed. Without a process group, just ``fn()``."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = (fn(), None)
        except BaseException as err:  # noqa: B036 - re-raised below, on every rank
            box[0] = (None, err if _survives_pickling(err) else
                      RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}"))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def _survives_pickling(err: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(err))
        return True
    except Exception:
        return False
