"""``run_unigendet_training``: UniGenDet's GDUF or DIGA stage from the public data formats.

Builds the model (a named config such as ``tiny``, a saved folder, or a BAGEL base folder plus
``checkpoint``), the rank's data stream (:mod:`aigid.data.unigendet_stream` over the readers of
:mod:`aigid.data.unigendet_sources`), runs :func:`aigid.training.unigendet.gduf.train_gduf` or
:func:`aigid.training.unigendet.diga.train_diga` on its packs, and writes into ``out``:
``train_log.jsonl`` (one line per step: losses, lr, tokens, samples, skipped counts),
``train_summary.json``, ``data_state.json`` (the stream position after the last step: give it
back as ``data_state`` to continue) and the model (``save_pretrained``; the EMA weights when the
run keeps an EMA, as the public release ships ``ema.safetensors``).

The data config (a dict, or a JSON/YAML file whose relative paths are read from its folder)::

    {"detection":  {"path": "fakeclue/data_json/train.json", "image_root": "fakeclue/train"},
     "generation": {"path": "laion/shards", "format": "tar"},
     "mix": "weighted", "det_weight": 5, "gen_weight": 1,
     "max_tokens": 36864, "max_tokens_per_sample": 16384}

DIGA reads ``generation`` only (upstream's ``unigendet_DIGA.yaml`` is t2i only).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import asdict, fields
from typing import Any, Iterator, Union

import torch
from tqdm.auto import tqdm

from aigid.data.transforms import eval_transform
from aigid.data.unigendet_sources import open_source
from aigid.data.unigendet_stream import Pack, TokenCounter, UniGenDetStream
from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from aigid.training import dist
from aigid.training.dist import DistContext
from aigid.training.unigendet.common import DetectionItem, DIGAConfig, GDUFConfig, GenerationItem, RunOptions
from aigid.training.unigendet.diga import train_diga
from aigid.training.unigendet.gduf import train_gduf
from aigid.training.unigendet.shard import build_sharded, build_teacher, export_pretrained

__all__ = ["run_unigendet_training", "build_stream", "token_counter", "gduf_batches", "diga_batches",
           "load_data_config", "STAGES"]

log = logging.getLogger(__name__)

STAGES = ("gduf", "diga")
LOG_FILE, SUMMARY_FILE, DATA_STATE_FILE = "train_log.jsonl", "train_summary.json", "data_state.json"
_STREAM_KEYS = ("mix", "det_weight", "gen_weight", "max_tokens", "max_tokens_per_sample", "max_carry")


# ---- data ---------------------------------------------------------------------------------------
def load_data_config(data: Union[str, os.PathLike, dict[str, Any]]) -> dict[str, Any]:
    """The data config as a dict with its paths resolved (against the file's folder)."""
    if isinstance(data, dict):
        return dict(data)
    path = os.fspath(data)
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ImportError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write "
                                  "the data config as JSON") from None
            cfg = yaml.safe_load(f)
        else:
            cfg = json.load(f)
    base = os.path.dirname(os.path.abspath(path))
    for kind in ("detection", "generation"):
        spec = cfg.get(kind)
        if spec is None:
            continue
        spec = {"path": spec} if isinstance(spec, str) else dict(spec)
        spec["path"] = [os.path.join(base, p) for p in spec["path"]] if isinstance(spec["path"], list) \
            else os.path.join(base, spec["path"])
        if spec.get("image_root"):
            spec["image_root"] = os.path.join(base, spec["image_root"])
        cfg[kind] = spec
    return cfg


def token_counter(model: UniGenDet) -> TokenCounter:
    """BAGEL's token estimate with this model's tokenizer, VAE stride and ViT resize/patch."""
    c = model.config
    vr = c.vit_resize
    return TokenCounter(count_text=lambda s: len(model.tokenizer.encode(s)),
                        vae_stride=int(c.vae.get("downsample", 8)) * c.latent_patch_size,
                        vit_resize=(int(vr["max_size"]), int(vr["min_size"]), int(vr["stride"])),
                        vit_patch=int(c.vit["patch_size"]))


def build_stream(data: dict[str, Any], model: UniGenDet, stage: str = "gduf", *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> UniGenDetStream:
    """The rank's stream over a (resolved) data config, sized for ``model``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if data.get("generation") is None:
        raise ValueError("the data config needs a 'generation' source")
    det = None
    if stage == "gduf" and data.get("detection") is not None:
        det = open_source(data["detection"], "det", seed)
    gen = open_source(data["generation"], "gen", seed)
    kw = {k: data[k] for k in _STREAM_KEYS if k in data}
    if stage == "diga":
        kw.pop("mix", None)
    return UniGenDetStream(det, gen, transform=eval_transform(model.config.preprocess),
                           tokens=token_counter(model), rank=rank, world_size=world_size, seed=seed, **kw)


def _det_items(pack: Pack) -> list[DetectionItem]:
    # DetectionItem has no question: the model asks config.question (see the report on wiring)
    return [DetectionItem(s.pixels, s.label, s.explanation) for s in pack.det]


def _gen_items(pack: Pack) -> list[GenerationItem]:
    return [GenerationItem(s.prompt, s.pixels) for s in pack.gen]


def gduf_batches(packs: Iterator[Pack]) -> Iterator[tuple[list[DetectionItem], list[GenerationItem]]]:
    """(detection items, generation items) per pack, as ``train_gduf`` takes them."""
    for pack in packs:
        yield _det_items(pack), _gen_items(pack)


def diga_batches(packs: Iterator[Pack]) -> Iterator[list[GenerationItem]]:
    """Generation items per pack, as ``train_diga`` takes them."""
    for pack in packs:
        yield _gen_items(pack)


# ---- the run --------------------------------------------------------------------------------------
def _build_model(config: dict[str, Any], ctx: DistContext) -> UniGenDet:
    """One process: the folder or the named config. Under torchrun: sharded with FSDP2 from a
    folder, rank 0 reading the weights (:func:`aigid.training.unigendet.shard.build_sharded`)."""
    name = config.get("model", "tiny")
    load = {"allow_random_heads": config.get("allow_random_heads", True)}
    if config.get("checkpoint"):
        load["checkpoint"] = config["checkpoint"]
    if ctx.distributed:
        if not os.path.isdir(name):
            raise ValueError(f"model {name!r}: under torchrun the model must be a folder (save a named "
                             "config with save_pretrained first), so every rank loads the same weights")
        return build_sharded(name, ctx, gradient_checkpointing=bool(config.get("gradient_checkpointing")),
                             **load)
    if os.path.isdir(name):
        return UniGenDet.from_pretrained(name, config.get("checkpoint"),
                                         allow_random_heads=load["allow_random_heads"])
    return UniGenDet(UniGenDetConfig.named(name), seed=config.get("seed", 0))


def _train_config(stage: str, config: dict[str, Any], data: dict[str, Any]) -> GDUFConfig:
    cls = GDUFConfig if stage == "gduf" else DIGAConfig
    known = {f.name for f in fields(cls)}
    over = dict(config.get("train") or {})
    unknown = set(over) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    if stage == "gduf":                      # the model's loss check and the stream share one mix
        for k in ("mix", "det_weight", "gen_weight"):
            if k in data:
                over[k] = data[k]
    over.setdefault("seed", config.get("seed", 0))
    if "steps" in config:
        over["steps"] = config["steps"]
    preset = config.get("preset", "code")
    if preset == "code":
        return cls.code_preset(**over)
    if preset == "paper":
        return cls(**over)
    raise ValueError(f"preset must be 'code' or 'paper', got {preset!r}")


def _rank_world(config: dict[str, Any], ctx: DistContext) -> tuple[int, int]:
    if "rank" in config or "world_size" in config:
        return int(config.get("rank", 0)), int(config.get("world_size", 1))
    return ctx.rank, ctx.world_size


def _skipped(counters: dict[str, dict[str, int]]) -> dict[str, int]:
    return {k: sum(v for name, v in c.items() if name != "samples") for k, c in counters.items()}


def run_unigendet_training(config: dict[str, Any]) -> dict[str, Any]:
    """Train one stage; returns the summary (also written to ``out``) with the trained model
    under ``"model"``.

    ``config``: ``stage`` ("gduf" | "diga"), ``data`` (data config dict or file), ``out``,
    ``model`` (a shipped config name or a folder; default ``tiny``), ``checkpoint`` (fine-tuned
    weights over a BAGEL base folder), ``preset`` ("code", default: the released scripts'
    hyper-parameters; "paper"), ``train`` (GDUFConfig/DIGAConfig fields over the preset),
    ``steps``, ``seed``, ``device`` ("cpu", "cuda", default: cuda when present), ``rank``/
    ``world_size`` (default: torchrun's, else 0/1), ``data_state`` (a saved
    ``data_state.json`` or its dict: continue the data where it stopped), ``progress`` (tqdm),
    ``checkpoint_every`` (DCP checkpoints under ``out/checkpoints`` every that many steps; a rerun
    resumes from the newest one, data position included), ``gradient_checkpointing``.

    Under ``torchrun`` the model is sharded (FSDP2 per layer on a nodes × GPUs mesh), each rank
    reads its own share of the data, and rank 0 writes the logs and the exported folder."""
    stage = config.get("stage", "gduf")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    out = config["out"]
    data = load_data_config(config["data"])
    ctx = dist.init()
    dist.rank0_only_logging(ctx)
    rank, world = _rank_world(config, ctx)
    cfg = _train_config(stage, config, data)
    device = ctx.device if ctx.distributed else (
        config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _build_model(config, ctx).to(device)
    stream = build_stream(data, model, stage, rank=rank, world_size=world, seed=cfg.seed)
    ckpt_dir = os.path.join(out, "checkpoints")
    found = dist.latest_checkpoint(ckpt_dir)
    if found is not None:                    # a rerun of a killed run: its data position first
        stream.load_state_dict(found[1]["data"])
        log.info("unigendet %s: resuming from %s", stage, found[0])
    elif config.get("data_state"):
        state = config["data_state"]
        if not isinstance(state, dict):
            with open(state) as f:
                state = json.load(f)
        stream.load_state_dict(state)
    os.makedirs(out, exist_ok=True)
    run = RunOptions(ctx if ctx.distributed else None, checkpoint_dir=ckpt_dir,
                     checkpoint_every=int(config.get("checkpoint_every", 0)), data_state=stream.state_dict)
    teacher = None
    if stage == "diga" and ctx.distributed:  # a second sharded model, never a deep copy of one
        teacher = build_teacher(config["model"], ctx, allow_random_heads=True)
    packs: list[Pack] = []

    def tracked() -> Iterator[Pack]:
        for pack in itertools.islice(stream, cfg.steps):   # no pack built past the last step
            packs[:] = [pack]
            yield pack

    bar = tqdm(total=cfg.steps, desc=f"unigendet {stage}", unit="step",
               disable=not config.get("progress", True) or ctx.rank != 0)
    totals = {"tokens": 0, "det": 0, "gen": 0}
    start = time.perf_counter()
    log_path = os.path.join(out, LOG_FILE) if ctx.rank == 0 else os.devnull
    with open(log_path, "a" if found is not None else "w", buffering=1) as logf:
        def log_step(step: int, losses: dict[str, float]) -> None:
            pack = packs[0]
            totals["tokens"] += pack.tokens
            totals["det"] += len(pack.det)
            totals["gen"] += len(pack.gen)
            rec = {"step": step + 1, **losses, "tokens": pack.tokens, "det_samples": len(pack.det),
                   "gen_samples": len(pack.gen), "skipped": _skipped(stream.counters)}
            logf.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{losses['loss']:.3f}", tokens=pack.tokens)
            bar.update(1)

        try:
            if stage == "gduf":
                history, ema = train_gduf(model, gduf_batches(tracked()), cfg, log=log_step, run=run)
            else:
                _, history, ema = train_diga(model, diga_batches(tracked()), cfg, log=log_step,
                                             teacher=teacher, run=run)
        finally:
            bar.close()
            stream.close()
    seconds = time.perf_counter() - start
    state = stream.state_dict()
    if ctx.rank == 0:
        with open(os.path.join(out, DATA_STATE_FILE + (f".rank{rank}" if world > 1 else "")), "w") as f:
            json.dump(state, f)
    summary: dict[str, Any] = {
        "stage": stage, "config": {**{k: v for k, v in config.items() if k != "data_state"},
                                   "data": config["data"] if isinstance(config["data"], str) else "(dict)"},
        "train": asdict(cfg), "steps": len(history), "seconds": round(seconds, 2), "device": str(device),
        "rank": rank, "world_size": world, "tokens": totals["tokens"],
        "tokens_per_s": round(totals["tokens"] / seconds, 1) if seconds > 0 else None,
        "samples": {"det": totals["det"], "gen": totals["gen"]}, "counters": state["counters"],
        "skipped": _skipped(state["counters"]), "weights": "ema" if ema is not None else "model",
        "final": history[-1] if history else None, "train_data": {"total": totals["det"] + totals["gen"]},
    }
    model.eval()
    if ctx.distributed:                      # every rank gathers its shards; rank 0 writes
        export_pretrained(model, out, ctx, ema=ema, summary=summary)
        dist.teardown(ctx)
    else:
        if ema is not None:
            ema.copy_to(model)
        model.save_pretrained(out, summary=summary)
    if ctx.rank != 0:
        return summary
    with open(os.path.join(out, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if sum(summary["skipped"].values()):
        log.warning("unigendet %s: skipped %s unusable samples (see %s)", stage, summary["skipped"],
                    os.path.join(out, SUMMARY_FILE))
    summary["model"] = model                 # as aigid.train's summary["detector"]: not written
    return summary
