"""Compile-time evidence for the Triton kernels, on a machine without a GPU.

    python benchmarks/compile_report.py          # writes benchmarks/results/compile-sm90a.json, -sm80.json

What it does, per target (``GPUTarget("cuda", 90, 32)`` = sm_90a / H100, ``("cuda", 80, 32)`` =
sm_80 / A100):

1. **Enumerate launches.** The autograd functions of ``aigid.kernels.supcon_bank`` and
   ``aigid.kernels.smsa_attention`` run forward + backward on *fake* CUDA tensors
   (``FakeTensorMode``: shapes and dtypes, no memory, no GPU) with each module's kernel globals
   swapped for recorders. So the launches are exactly what the modules would issue on that GPU —
   their own tile heuristics, split-K and grid code — for the benchmark grids and the models'
   shapes (``SHAPES``), with ``torch.cuda.get_device_properties`` answering for the target.
2. **Compile** each distinct launch ahead of time the way ``JITFunction.run`` does (its binder,
   ``_pack_args``, ``ASTSource``, ``triton.compile``), so the specialisation (16-byte alignment,
   divisibility of integer arguments) is the one a real launch gets. Host-side TMA descriptors
   (SMSA on sm_90a) are recorded with the block shape their config's ``pre_hook`` sets.
3. **Read the artefacts**: registers / spill (local) bytes from ``cuobjdump -res-usage`` on the
   cubin, shared memory from the metadata, MMA instruction shapes and TMA from the PTX, SASS
   opcode counts (HGMMA/HMMA/LDL/STL), then occupancy (CTAs per SM from registers, shared memory
   and threads), waves of the launch's grid, and executed MMA FLOPs ÷ useful FLOPs (the padding
   and recomputation the tiles cost; formulas in ``_flops``).

Everything here is a static estimate, not a measurement. ``check(record)`` lists what must never
ship: spills, a main dot without wgmma on sm_90a, shared memory over the per-block limit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger("aigid.compile_report")

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Device:
    """Per-SM limits (CUDA C Programming Guide, "Technical Specifications per Compute
    Capability"; H100/A100 whitepapers for the SM counts)."""
    name: str
    capability: int
    sms: int
    smem_per_sm: int         # bytes usable by CTAs on one SM
    smem_per_block: int      # opt-in maximum for one CTA
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    smem_reserved_per_cta: int = 1024  # the driver reserves 1 KB per CTA on sm_80+

    @property
    def tag(self) -> str:
        return f"sm{self.capability}{'a' if self.capability >= 90 else ''}"


H100 = Device("H100 SXM", 90, 132, 228 * 1024, 227 * 1024)
A100 = Device("A100 SXM", 80, 108, 164 * 1024, 163 * 1024)
DEVICES = {"sm90a": H100, "sm80": A100}


# ---------------------------------------------------------------------------------------------
# Shapes: the benchmark grids and the models' calls
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SupConShape:
    origin: str
    n: int
    m: int
    d: int = 768
    a: int = 2
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class SMSAShape:
    origin: str
    batch: int
    heads_q: int
    heads_kv: int
    l_q: int
    source_lengths: tuple[int, ...]
    head_dim: int = 128
    dtype: str = "bfloat16"


def default_shapes() -> list[Any]:
    """benchmarks/test_supcon_bank.py and test_smsa_attention.py's CUDA grids, MiraGe's
    defaults (batch 32, bank 64, ViT-L/14's 768-d embedding, 2 text anchors) and UniGenDet's
    SMSA (BAGEL-7B: 28 query heads, 4 KV heads, d = 128; one image: 1024 ViT queries over
    [64 text-prefix, 1024 VAE, 1024 ViT] keys — a representative packing, not a fixed one)."""
    shapes: list[Any] = [SupConShape(f"bench N{n} M{m}", n, m)
                         for n in (256, 1024, 4096) for m in (64, 4096, 65536)]
    shapes.append(SupConShape("model MiraGe defaults", 32, 64))
    # the other configs _config picks: 1024-d (ViT-H), unaligned 16-bit D, fp32 (IEEE dots)
    shapes += [SupConShape("kernel bf16 D1024", 512, 4096, d=1024),
               SupConShape("kernel fp16 D1000 (unaligned)", 512, 4096, d=1000, dtype="float16"),
               SupConShape("kernel fp32 D768", 512, 4096, dtype="float32"),
               SupConShape("kernel fp32 D33 (unaligned)", 512, 4096, d=33, dtype="float32")]
    # the one-program path (supcon_small.py) at its limits, per config it can pick
    shapes += [SupConShape("small bf16 D768 limits", 64, 128, a=16),
               SupConShape("small fp16 D1000 limits (unaligned)", 64, 64, d=1000, a=16,
                           dtype="float16"),
               SupConShape("small fp32 D768 limits", 64, 128, a=16, dtype="float32"),
               SupConShape("small fp32 D768 empty bank", 32, 0, dtype="float32"),
               SupConShape("small fp32 D1000 limits (unaligned)", 64, 64, d=1000, a=16,
                           dtype="float32")]
    shapes += [SMSAShape(f"bench Lq{l}", 2, 16, 4, l, (l, l, l)) for l in (256, 1024, 4096)]
    shapes.append(SMSAShape("model UniGenDet 1 image", 1, 28, 4, 1024, (64, 1024, 1024)))
    return shapes


def representative_shapes() -> list[Any]:
    """A few launches for the CPU test: one per kernel family, the sizes the issue targets."""
    return [SupConShape("bench N4096 M65536", 4096, 65536),
            SMSAShape("model UniGenDet 1 image", 1, 28, 4, 1024, (64, 1024, 1024))]


# ---------------------------------------------------------------------------------------------
# 1. Enumerating launches
# ---------------------------------------------------------------------------------------------

@dataclass
class Launch:
    module: Any               # the kernel module
    kernel: str               # its global name
    grid: tuple[int, int, int]
    args: tuple               # positional args; tensors replaced by empty CPU tensors (dtype kept)
    kwargs: dict
    origin: str
    shape: Any = None


def _is_descriptor(a) -> bool:
    from triton.tools.tensor_descriptor import TensorDescriptor
    return isinstance(a, TensorDescriptor)


def _cpu_descriptor(desc):
    """A host-side TMA descriptor over an empty CPU tensor of the same dtype, with the shape,
    strides and *current* block shape of ``desc`` (a config's ``pre_hook`` sets the block shape
    just before its launch, and the next config's overwrites it: this is the snapshot). The
    binder specialises a descriptor on its dtype and block shape only."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(torch.empty(0, dtype=desc.base.dtype), [int(n) for n in desc.shape],
                            [int(s) for s in desc.strides], list(desc.block_shape), desc.padding,
                            desc.round_f32_to_tf32)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kw)`` records instead of running.
    Tensor arguments become empty CPU tensors, TMA descriptors (positional or keyword) CPU
    descriptors (``_cpu_descriptor``)."""

    def __init__(self, module, name: str, sink: list[Launch], origin: Callable[[], str]):
        self.module, self.name, self.sink, self.origin = module, name, sink, origin

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import torch
            # outside fake mode these are real, 0-element, 16-byte-aligned tensors: what the
            # binder needs to specialise like a real (allocator-aligned) launch
            with _no_fake():
                args2 = tuple(torch.empty(0, dtype=a.dtype) if isinstance(a, torch.Tensor) else
                              _cpu_descriptor(a) if _is_descriptor(a) else a for a in args)
                kwargs2 = {k: _cpu_descriptor(v) if _is_descriptor(v) else v
                           for k, v in kwargs.items()}
            g = tuple(int(x) for x in (grid(kwargs) if callable(grid) else grid))
            g = (g + (1, 1))[:3]
            self.sink.append(Launch(self.module, self.name, g, args2, kwargs2, self.origin()))
        return launch


class _TunerRecorder(_Recorder):
    """Stands in for a ``triton.autotune`` kernel: records one launch per config that its
    early pruning keeps for these arguments (the set the autotuner would time), after running
    the config's ``pre_hook`` as the autotuner does (it sets TMA descriptors' block shapes)."""

    def __init__(self, module, name: str, sink: list[Launch], origin, tuner):
        super().__init__(module, name, sink, origin)
        self.tuner = tuner

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.tuner.fn.arg_names, args))
            configs = list(self.tuner.configs)
            prune = getattr(self.tuner, "early_config_prune", None)
            if prune is not None:
                configs = prune(configs, named, **kwargs)
            for cfg in configs:
                meta = {**named, **kwargs, **cfg.all_kwargs()}
                if cfg.pre_hook is not None:
                    cfg.pre_hook(meta)
                g = grid(meta) if callable(grid) else grid
                _Recorder.__getitem__(self, g)(*args, **kwargs, **cfg.all_kwargs())
        return launch


def _global_name(mod, fn) -> str:
    """The module-level name of a JIT function (what ``compile_launch`` looks up)."""
    for name, val in vars(mod).items():
        if val is fn:
            return name
    raise LookupError(f"{fn} is not a global of {mod.__name__}")


@contextlib.contextmanager
def _no_fake():
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():
        yield


def _fake_props(dev: Device):
    return types.SimpleNamespace(
        name=dev.name, major=dev.capability // 10, minor=dev.capability % 10,
        multi_processor_count=dev.sms, shared_memory_per_block_optin=dev.smem_per_block,
        shared_memory_per_multiprocessor=dev.smem_per_sm, total_memory=80 * 2**30)


@contextlib.contextmanager
def _pretend_gpu(dev: Device, modules: Iterable[Any], sink: list[Launch],
                 origin: Callable[[], str]):
    """Kernel globals → recorders; torch.cuda's device queries answer for ``dev``."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    saved: list[tuple[Any, Any, Any]] = []

    missing = object()

    def swap(obj, name, value):  # own attributes only: an inherited one is deleted afterwards
        own = vars(obj).get(name, missing) if isinstance(obj, type) else getattr(obj, name)
        saved.append((obj, name, own))
        setattr(obj, name, value)

    try:
        def recorder(mod, val):
            if isinstance(val, Autotuner):
                return _TunerRecorder(mod, names[id(val.fn)], sink, origin, val)
            if isinstance(val, JITFunction):
                return _Recorder(mod, names[id(val)], sink, origin)
            return None

        for mod in modules:
            names = {id(v): k for k, v in vars(mod).items() if isinstance(v, JITFunction)}
            for name, val in list(vars(mod).items()):
                rec = recorder(mod, val)
                if rec is not None:
                    swap(mod, name, rec)
                elif isinstance(val, dict):  # e.g. {"fwd": autotuned kernel, ...}
                    for key, item in list(val.items()):
                        rec = recorder(mod, item)
                        if rec is not None:
                            saved.append((val, key, item))
                            val[key] = rec
            for name, val in list(vars(mod).items()):  # caches of device queries (lru_cache)
                if hasattr(val, "cache_clear"):
                    val.cache_clear()
            for name, val in list(vars(mod).items()):
                if isinstance(val, type) and issubclass(val, torch.autograd.Function) \
                        and val is not torch.autograd.Function:
                    swap(val, "apply", staticmethod(_apply_fwd_bwd(val)))
        swap(torch.cuda, "get_device_properties", lambda *_a, **_k: _fake_props(dev))
        swap(torch.cuda, "current_device", lambda: 0)
        swap(torch.cuda, "get_device_capability",
             lambda *_a, **_k: (dev.capability // 10, dev.capability % 10))
        yield
    finally:
        for obj, name, val in reversed(saved):
            if val is missing:
                delattr(obj, name)
            elif isinstance(obj, dict):
                obj[name] = val
            else:
                setattr(obj, name, val)
        for mod in modules:
            for val in vars(mod).values():
                if hasattr(val, "cache_clear"):
                    val.cache_clear()


def _kernel_modules():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_report needs compiled (not interpreted) kernels: run it "
                           "without TRITON_INTERPRET=1")
    from aigid.kernels import smsa_attention, supcon_bank, supcon_small
    return supcon_bank, smsa_attention, supcon_small


class _Ctx:
    """Enough of autograd's ctx for the kernels' Functions."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *_):
        pass

    def set_materialize_grads(self, *_):
        pass


def _apply_fwd_bwd(fn_cls):
    """``Function.apply`` that runs forward then backward directly: autograd's engine would ask
    the (absent) CUDA driver about the fake device."""
    import torch

    def apply(*args):
        ctx = _Ctx()
        ctx.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad
                                     for a in args)
        with torch.no_grad():
            out = fn_cls.forward(ctx, *args)
            fn_cls.backward(ctx, torch.ones_like(out))
        return out
    return apply


def _run_shape(shape: Any, supcon_mod, smsa_mod) -> None:
    """Forward + backward of one shape on fake CUDA tensors (launches go to the recorders)."""
    import torch
    dtype = getattr(torch, shape.dtype)
    dev = "cuda"
    if isinstance(shape, SupConShape):
        feats = torch.empty(shape.n, shape.d, device=dev, dtype=dtype, requires_grad=True)
        anchors = torch.empty(shape.a, shape.d, device=dev, dtype=dtype, requires_grad=True)
        bank = torch.empty(shape.m, shape.d, device=dev, dtype=dtype)
        lab = torch.zeros(shape.n, device=dev, dtype=torch.int64)
        loss = supcon_mod.supcon_bank_loss_triton(
            feats, lab, bank, torch.zeros(shape.m, device=dev, dtype=torch.int64), anchors,
            torch.arange(shape.a, device=dev), 0.07)
        del loss
    else:
        q = torch.empty(shape.batch, shape.heads_q, shape.l_q, shape.head_dim, device=dev,
                        dtype=dtype, requires_grad=True)
        sources = [tuple(torch.empty(shape.batch, shape.heads_kv, l, shape.head_dim, device=dev,
                                     dtype=dtype, requires_grad=True) for _ in range(2))
                   for l in shape.source_lengths]
        smsa_mod.smsa_attention_triton(q, sources)


def enumerate_launches(dev: Device, shapes: Iterable[Any]) -> list[Launch]:
    """Every kernel launch the modules issue on ``dev`` for ``shapes`` (forward + backward)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    supcon_mod, smsa_mod, small_mod = _kernel_modules()
    sink: list[Launch] = []
    current: list[Any] = [None]
    with _pretend_gpu(dev, (supcon_mod, smsa_mod, small_mod), sink,
                      lambda: current[0].origin):
        for shape in shapes:
            current[0] = shape
            start = len(sink)
            with FakeTensorMode(allow_non_fake_inputs=True):
                _run_shape(shape, supcon_mod, smsa_mod)
            for launch in sink[start:]:
                launch.shape = shape
    return sink


# ---------------------------------------------------------------------------------------------
# 2. Compiling (as JITFunction.run does, for a chosen target)
# ---------------------------------------------------------------------------------------------

def compile_launch(launch: Launch, capability: int):
    """``triton.compile`` of one launch for ``GPUTarget("cuda", capability, 32)``; returns
    (compiled kernel, bound arguments by name)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(launch.module, launch.kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{launch.kernel} is {type(fn).__name__}, not a JITFunction")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), dict(bound)


def _compile_key(launch: Launch) -> str:
    import torch

    def desc_key(a):  # what the binder specialises a descriptor on
        return f"tensordesc<{a.base.dtype}{list(a.block_shape)}>"

    args = [str(a.dtype) if isinstance(a, torch.Tensor) else desc_key(a) if _is_descriptor(a) else
            (f"i{a % 16 == 0}{a == 1}" if isinstance(a, int) and not isinstance(a, bool) else repr(a))
            for a in launch.args]
    kwargs = sorted((k, desc_key(v) if _is_descriptor(v) else v) for k, v in launch.kwargs.items())
    return f"{launch.kernel}|{args}|{kwargs}"


# ---------------------------------------------------------------------------------------------
# 3. Reading the artefacts
# ---------------------------------------------------------------------------------------------

def _nvidia_bin(name: str) -> Optional[str]:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _cubin_tools(cubin: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(resource usage {REG, STACK, SHARED, LOCAL, ...}, SASS opcode counts) via cuobjdump."""
    tool = _nvidia_bin("cuobjdump")
    if tool is None:
        return {}, {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)", res)}
    ops: dict[str, int] = {}
    for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]+)", sass):
        base = op
        ops[base] = ops.get(base, 0) + 1
    keep = ("HGMMA", "HMMA", "QGMMA", "FFMA", "LDL", "STL", "UTMALDG", "LDGSTS", "SYNCS")
    return usage, {k: v for k, v in ops.items() if k in keep}


_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)\.(\w+)")
_MMA = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.\w+\.\w+\.(\w+)\.(\w+)\.(\w+)")


def ptx_mma(ptx: str) -> dict[str, int]:
    """Static count of tensor-core instructions by shape and types, e.g.
    {"wgmma m64n64k16 f32.bf16.bf16": 24, "mma.sync m16n8k16 f32.bf16.bf16.f32": 64}."""
    out: dict[str, int] = {}
    for m in _WGMMA.finditer(ptx):
        key = f"wgmma {m.group(1)} {m.group(2)}.{m.group(3)}.{m.group(4)}"
        out[key] = out.get(key, 0) + 1
    for m in _MMA.finditer(ptx):
        key = f"mma.sync {m.group(1)} {m.group(2)}.{m.group(3)}.{m.group(4)}"
        out[key] = out.get(key, 0) + 1
    return out


def ctas_per_sm(dev: Device, regs: int, smem: int, threads: int) -> tuple[int, str]:
    """Occupancy from the per-SM limits (registers are allocated per warp in 256s)."""
    warps = threads // 32
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (dev.regs_per_sm // regs_per_warp) // warps
    by_smem = dev.smem_per_sm // (smem + dev.smem_reserved_per_cta) if smem else dev.max_ctas_per_sm
    by_threads = dev.max_threads_per_sm // threads
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads,
              "CTA slots": dev.max_ctas_per_sm}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def _flops(kernel: str, bound: dict[str, Any], grid: tuple[int, int, int]
           ) -> Optional[tuple[float, float, str]]:
    """(executed MMA FLOPs, useful FLOPs, what "useful" counts) for one launch, or None for a
    kernel without dots / with unknown arguments. Executed = every tile product the grid issues,
    padded to the tile sizes; useful = the algorithm's products on the real sizes, counting each
    logit tile once in a backward (flash-attention's convention)."""
    b = bound
    cdiv = lambda x, y: -(-x // y)
    try:
        if kernel == "_supcon_fwd_kernel":
            n, a, m, d, bm, bn, bd, split = (b[k] for k in ("N", "A", "M", "D", "BLOCK_M",
                                                            "BLOCK_N", "BLOCK_D", "split_len"))
            keys = _supcon_padded_keys(n, a, m, split, grid[1], bn)
            exe = 2 * grid[0] * bm * keys * cdiv(d, bd) * bd
            return exe, 2 * n * (n + a + m) * d, "logits q·kᵀ"
        if kernel == "_supcon_bwd_weights_kernel":
            n, d, bm, bn, bd, cols = (b[k] for k in ("N", "D", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                                                     "n_cols"))
            exe = 2 * grid[0] * bm * grid[1] * bn * cdiv(d, bd) * bd
            return exe, 2 * n * cols * d, "logits once (G·K and Gᵀ·Q run as cuBLAS GEMMs)"
        if kernel in ("_small_fwd_kernel", "_small_bwd_kernel"):
            n, a, m, d, bm, ba, bb, tiles, bd = (b[k] for k in (
                "N", "A", "M", "D", "BLOCK_M", "BLOCK_A", "BLOCK_B", "BANK_TILES", "BLOCK_D"))
            keys = n + a + m
            padded_keys = bm + ba + tiles * bb
            exe = 2 * bm * padded_keys * cdiv(d, bd) * bd
            useful = 2 * n * keys * d
            if kernel == "_small_fwd_kernel":
                return exe, useful, "logits q·kᵀ"
            d_out = cdiv(d, b["BLOCK_DO"]) * b["BLOCK_DO"]
            nf, na = bool(b["NEED_F"]), bool(b["NEED_A"])
            # grad_feats = (G_b + G_bᵀ)·Q + G_a·A + G_m·Bank: the batch's dq and dk in one dot
            exe += nf * 2 * bm * padded_keys * d_out + na * 2 * ba * bm * d_out
            useful += nf * 2 * n * keys * d + 2 * n * (nf * n + na * a) * d
            return exe, useful, "logits once + G·K + Gᵀ·Q"
        if kernel in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
            s = b["NUM_SOURCES"]
            lens = [b[f"L{i}"] for i in range(s)]
            d, bm, bn, l_q = b["D"], b["BLOCK_M"], b["BLOCK_N"], b["L_q"]
            rows = b["B"] * b["H_q"] * l_q
            dots = {"_fwd_kernel": 2, "_bwd_dq_kernel": 3, "_bwd_dkdv_kernel": 4}[kernel]
            useful = 2 * dots * rows * sum(lens) * d
            if kernel == "_bwd_dkdv_kernel":
                exe = 2 * dots * (grid[1] * b["GROUP"]) * cdiv(l_q, bm) * bm * \
                    sum(cdiv(l, bn) * bn for l in lens) * d
            else:
                exe = 2 * dots * grid[1] * grid[0] * bm * sum(cdiv(l, bn) * bn for l in lens) * d
            what = {2: "QKᵀ, PV", 3: "QKᵀ, dO·Vᵀ, dS·K", 4: "QKᵀ, P·dO, V·dOᵀ, dS·Q"}[dots]
            return exe, useful, what
    except KeyError as e:  # a kernel's arguments were renamed: say so rather than guess
        log.warning("no FLOP model for %s: argument %s not found", kernel, e)
    return None


def _supcon_padded_keys(n: int, a: int, m: int, split: int, splits: int, bn: int) -> int:
    """Key columns one row block visits over all splits, each source's loop padded to BLOCK_N."""
    total = 0
    for s in range(splits):
        lo, hi = s * split, (s + 1) * split
        for start, length in ((0, n), (n, a), (n + a, m)):
            part = max(0, min(hi, start + length) - max(lo, start))
            total += -(-part // bn) * bn
    return total


@dataclass
class KernelRecord:
    kernel: str
    module: str
    origin: list[str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    mma: dict[str, int]
    sass: dict[str, int]
    tma: bool
    ctas_per_sm: int
    occupancy_limiter: str
    launches: list[dict] = field(default_factory=list)


def analyse(dev: Device, launches: list[Launch]) -> list[KernelRecord]:
    """Compile each distinct launch for ``dev`` and read its artefacts."""
    by_key: dict[str, list[Launch]] = {}
    for launch in launches:
        by_key.setdefault(_compile_key(launch), []).append(launch)
    records = []
    for group in by_key.values():
        first = group[0]
        kernel, bound = compile_launch(first, dev.capability)
        usage, sass = _cubin_tools(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        md = kernel.metadata
        smem = int(md.shared) + usage.get("SHARED", 0)
        threads = md.num_warps * 32 * getattr(md, "num_ctas", 1)
        regs = usage.get("REG", 0)
        ctas, limiter = ctas_per_sm(dev, regs, smem, threads)
        fn = getattr(first.module, first.kernel)
        const_names = [p.name for p in fn.params if p.is_constexpr]
        rec = KernelRecord(
            kernel=first.kernel, module=first.module.__name__,
            origin=sorted({l.origin for l in group}),
            constexprs={k: bound[k] for k in const_names if k in bound},
            num_warps=md.num_warps, num_stages=md.num_stages, registers=regs,
            # Triton kernels keep no local arrays: their stack frame is register spill
            spill_bytes=max(usage.get("LOCAL", 0), usage.get("STACK", 0)),
            stack_bytes=usage.get("STACK", 0),
            shared_bytes=smem, mma=ptx_mma(ptx), sass=sass,
            tma="cp.async.bulk.tensor" in ptx, ctas_per_sm=ctas, occupancy_limiter=limiter)
        for launch in group:
            _, lb = _bind(launch)
            ctas_total = launch.grid[0] * launch.grid[1] * launch.grid[2]
            entry = {"origin": launch.origin, "grid": list(launch.grid), "ctas": ctas_total,
                     "waves": round(ctas_total / (ctas * dev.sms), 3) if ctas else None}
            fl = _flops(launch.kernel, lb, launch.grid)
            if fl is not None:
                exe, useful, what = fl
                entry.update(mma_flops=exe, useful_flops=useful, useful_counts=what,
                             mma_over_useful=round(exe / useful, 3) if useful else None)
            rec.launches.append(entry)
        records.append(rec)
    return records


def _bind(launch: Launch) -> tuple[Any, dict[str, Any]]:
    """Arguments by name (constexpr defaults included), without compiling."""
    import inspect
    fn = getattr(launch.module, launch.kernel)
    kw = {k: v for k, v in launch.kwargs.items() if k in fn.arg_names}
    ba = inspect.signature(fn.fn).bind(*launch.args, **kw)
    ba.apply_defaults()
    return fn, dict(ba.arguments)


def check(record: dict, dev: Device) -> list[str]:
    """What must not ship, for one kernel record of ``report``: register spills, shared memory
    over the per-block limit, and on sm_90a a kernel with 16-bit dots that has no wgmma."""
    problems = []
    name = f"{record['kernel']} {record['constexprs']}"
    if record["spill_bytes"] or record["sass"].get("STL", 0):
        problems.append(f"{name} (warps {record['num_warps']}, stages {record['num_stages']}): spills "
                        f"{record['spill_bytes']} B to the stack "
                        f"({record['sass'].get('STL', 0)} STL)")
    if record["shared_bytes"] > dev.smem_per_block:
        problems.append(f"{name}: {record['shared_bytes']} B shared memory > "
                        f"{dev.smem_per_block} B per block on {dev.name}")
    if dev.capability >= 90 and record.get("has_main_dot"):
        if not any(k.startswith("wgmma") for k in record["mma"]):
            problems.append(f"{name}: no wgmma on {dev.tag} (mma: {record['mma'] or 'none'})")
    return problems


def _machine_info() -> dict[str, Any]:
    """The host that compiled (pytest-benchmark's machine_info fields): no GPU is involved, the
    target is ``device``."""
    import platform
    return {"node": platform.node(), "processor": platform.processor(),
            "machine": platform.machine(), "python_implementation":
            platform.python_implementation(), "python_version": platform.python_version(),
            "system": platform.system(), "release": platform.release(),
            "cpu_count": os.cpu_count(), "gpu": None}


def report(dev: Device, shapes: Iterable[Any]) -> dict:
    """The JSON document for one target."""
    import torch
    import triton
    recs = analyse(dev, enumerate_launches(dev, shapes))
    kernels = []
    for r in recs:
        d = dict(vars(r))
        # a main dot: the kernel's FLOP model counts tensor-core work at 16-bit precision
        d["has_main_dot"] = bool(r.launches and "mma_flops" in r.launches[0]) and \
            r.constexprs.get("DOT_PREC") != "ieee"
        kernels.append(d)
    doc = {"target": dev.tag, "device": vars(dev) | {"tag": dev.tag},
           "triton": triton.__version__, "torch": torch.__version__,
           "note": "static estimates from the compiled artefacts, not measurements",
           "machine_info": _machine_info(),
           "kernels": kernels}
    doc["problems"] = [p for k in kernels for p in check(k, dev)]
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--targets", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for tag in args.targets:
        doc = report(DEVICES[tag], default_shapes())
        path = args.out / f"compile-{tag}.json"
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log.info("%s: %d kernels, %d problems -> %s", tag, len(doc["kernels"]),
                 len(doc["problems"]), path)
        for prob in doc["problems"]:
            log.error("  %s", prob)
        status |= bool(doc["problems"])
    return status


if __name__ == "__main__":
    raise SystemExit(main())
