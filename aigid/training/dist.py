"""torchrun set-up shared by the trainers: process group, 2-D device mesh, small collectives, DCP
checkpoints.

Launch with ``torchrun --nproc_per_node N [--nnodes M ...]``; :func:`init` reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), joins the process
group (gloo on CPU, nccl on CUDA) and builds the ``(replicate, shard)`` mesh: parameters are
sharded across the GPUs of a node and replicated across nodes (hybrid sharding, so the
cross-node traffic is one gradient all-reduce per step). Without torchrun's variables it returns
a single-process context (no process group), so the same code path runs in one process.

Checkpoints are ``torch.distributed.checkpoint`` folders, ``<dir>/step-<n>/``, each rank writing
its own shards; ``meta.json`` (step and the caller's data position) is written by rank 0 after
every rank finished, so a folder without it is an interrupted save and is never resumed from.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as tdist

__all__ = ["DistContext", "init", "single", "all_reduce_sum", "all_gather_ints", "barrier", "teardown",
           "rank0_only_logging", "save_checkpoint", "latest_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)
META = "meta.json"


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank/world, rank inside its node, nodes, device, mesh."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Any = None                      # DeviceMesh (replicate, shard), None in one process

    @property
    def nnodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0


def single(device: Union[str, torch.device] = "cpu") -> DistContext:
    """A one-process context: collectives are identities, checkpoints are written in place."""
    return DistContext(device=torch.device(device))


def init(backend: Optional[str] = None, device_type: Optional[str] = None) -> DistContext:
    """Join the torchrun job (or return :func:`single` when not launched by torchrun).

    ``device_type``: "cuda" when CUDA is available, else "cpu"; ``backend``: nccl for CUDA, gloo
    for CPU. Each CUDA rank takes GPU ``LOCAL_RANK``."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return single(device_type)
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local_world:
        raise RuntimeError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local_world}: "
                           "every node must run the same number of processes")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend or ("nccl" if device_type == "cuda" else "gloo"),
                                 rank=rank, world_size=world)
    mesh = init_device_mesh(device_type, (world // local_world, local_world),
                            mesh_dim_names=("replicate", "shard"))
    ctx = DistContext(rank, world, local_rank, local_world, device, mesh)
    log.info("aigid.training.dist: rank %d/%d (node %d of %d, local rank %d), %s, backend %s", rank, world,
             rank // local_world, ctx.nnodes, local_rank, device, tdist.get_backend())
    return ctx


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum over ranks (a new tensor; ``t`` itself in one process). Token counts and detached
    loss parts go through here: one small collective each."""
    if not ctx.distributed:
        return t
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_gather_ints(values: Sequence[int], ctx: DistContext) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank), in rank order."""
    local = torch.tensor(list(values), dtype=torch.long, device=ctx.device)
    if not ctx.distributed:
        return [local.tolist()]
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    tdist.all_gather(out, local)
    return [o.tolist() for o in out]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        tdist.barrier()


def teardown(ctx: DistContext) -> None:
    """Leave the process group (no-op in one process)."""
    if ctx.distributed and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def rank0_only_logging(ctx: DistContext, logger: Union[str, logging.Logger] = "aigid") -> None:
    """Ranks other than 0 keep only warnings and errors of ``logger`` (default: every aigid
    logger, through the package logger's level), so a job's progress log reads like one
    process's while a rank's own trouble still shows."""
    if ctx.rank != 0:
        lg = logging.getLogger(logger) if isinstance(logger, str) else logger
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))


# ---- checkpoints ----------------------------------------------------------------------------
def _step_dir(directory: Union[str, os.PathLike], step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def save_checkpoint(directory: Union[str, os.PathLike], step: int, state: dict[str, Any],
                    meta: dict[str, Any], ctx: DistContext) -> Path:
    """``dcp.save(state)`` into ``<directory>/step-<step>`` (every rank its shards), then rank 0
    writes ``meta.json`` (``{"step": step, **meta}``, JSON) once all ranks are done."""
    import torch.distributed.checkpoint as dcp

    path = _step_dir(directory, step)
    dcp.save(state, checkpoint_id=str(path), no_dist=not ctx.distributed)
    barrier(ctx)
    if ctx.is_main:
        tmp = path / (META + ".tmp")
        tmp.write_text(json.dumps({"step": step, **meta}))
        os.replace(tmp, path / META)
    barrier(ctx)
    return path


def latest_checkpoint(directory: Union[str, os.PathLike, None]) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint under ``directory`` and its meta (``step``, ``data``, …),
    or None. Readable without a process group: a runner calls it first to place its data."""
    if directory is None or not Path(directory).is_dir():
        return None
    done = sorted(p for p in Path(directory).glob("step-*") if (p / META).is_file())
    if not done:
        return None
    return done[-1], json.loads((done[-1] / META).read_text())


def load_checkpoint(path: Union[str, os.PathLike], state: dict[str, Any], ctx: DistContext) -> None:
    """``dcp.load`` into ``state`` in place (each rank reads the pieces of its own shards)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(path), no_dist=not ctx.distributed)
