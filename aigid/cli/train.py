"""``aigid demo``, ``aigid train`` (MiraGe) and ``aigid train-unigendet``."""
from __future__ import annotations

import logging
import os
import pickle

from aigid.cli.checks import (CommandFailed, UsageError, _checkpoint_file, _detector_folder, _device,
                              _json_file, _labelled, _must_exist, _non_negative, _positive, _positive_float,
                              _writable_dir)
from aigid.cli.common import _add_runtime, _command, _print_json

log = logging.getLogger("aigid.cli")


# ---- commands: check_<cmd> runs before any work, _cmd_<cmd> does it ------------------------------
def _check_demo(args) -> None:
    _writable_dir(args.out, "demo folder")


def _cmd_demo(args) -> int:
    from aigid.demo import demo_report, run_demo

    summary = run_demo(out=args.out, steps=args.steps, per_photo=args.per_photo, vae_steps=args.vae_steps,
                       seed=args.seed, progress=not args.quiet)
    print(demo_report(summary, args.out))
    return 0


def _overrides(args) -> dict:
    keys = ("alpha", "temperature", "bank_size", "prompt_depth", "prompt_tokens")  # argparse dests
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.pretrained is not None:
        out["backbone"] = {"model": args.backbone or "ViT-L-14", "pretrained": args.pretrained}
    if args.prompt_init is not None:
        out["prompt_init"] = args.prompt_init
    if args.resize_mode is not None:
        out["preprocess"] = {"resize_mode": args.resize_mode}
    return out


def _check_train(args) -> None:
    from aigid.data.labelled import has_split

    if args.backbone is not None and args.pretrained is None:
        raise UsageError("--backbone needs --pretrained (an open_clip tag or a checkpoint file)")
    _device(args.device)
    split = "train" if has_split(args.data, "train") else None
    labels = {s.label for s in _labelled(args.data, split)}
    if labels != {0, 1}:
        have = "real" if labels == {0} else "fake"
        raise UsageError(f"{os.path.join(args.data, split or '')}: training needs both real and fake "
                         f"images, found only {have} ones")
    if args.val is not None:
        _labelled(args.val, None)
    if os.path.isdir(args.model):
        _detector_folder(args.model)
    elif os.path.isfile(args.model):
        _json_file(args.model, "model config")
    if args.pretrained is not None:
        _checkpoint_file(args.pretrained, "--pretrained")
    _writable_dir(args.out, "detector folder")
    if os.path.isfile(os.path.join(args.out, "config.json")) and not (args.overwrite or args.resume):
        raise UsageError(f"{args.out}: a detector is already there; pass --overwrite to replace it "
                         f"when training ends, or choose another --out")


def _cmd_train(args) -> int:
    from aigid.training.mirage import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, val=args.val, model=args.model,
                      overrides=_overrides(args), cache_dir=args.cache_dir, epochs=args.epochs,
                      max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                      num_workers=args.workers, device=args.device, seed=args.seed,
                      warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                      download=args.allow_download, resume=args.resume, overwrite=args.overwrite,
                      checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    try:
        summary = train(cfg)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never follow it
        raise CommandFailed(f"{args.pretrained or args.model}: holds pickled objects other than "
                            f"weights, which aigid does not load") from None
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    print(f"saved detector to {args.out} ({summary['steps']} steps, {summary['seconds']} s)")
    if "val" in summary:
        _print_json(summary["val"]["overall"])
    if summary["skipped_files"]:
        log.warning("%d unreadable files skipped (see %s)", len(summary["skipped_files"]),
                    os.path.join(args.out, "train_summary.json"))
    return 0


def _check_train_unigendet(args) -> None:
    _must_exist(args.data, "data config")
    if args.data.endswith(".json"):
        _json_file(args.data, "data config")
    if os.path.isdir(args.model):
        _detector_folder(args.model)
    elif args.model not in ("tiny", "bagel-7b"):
        raise UsageError(f"{args.model}: no such model folder, and not a shipped config (tiny, bagel-7b)")
    if args.checkpoint:
        _must_exist(args.checkpoint, "checkpoint")
    if args.data_state:
        _json_file(args.data_state, "data state")
    _writable_dir(args.out, "output folder")


def _cmd_train_unigendet(args) -> int:
    from aigid.training.unigendet.run import run_unigendet_training

    train = {k: v for k, v in (("lr", args.lr), ("warmup_steps", args.warmup_steps)) if v is not None}
    summary = run_unigendet_training({
        "stage": args.stage, "data": args.data, "out": args.out, "model": args.model,
        "checkpoint": args.checkpoint, "preset": args.preset, "steps": args.steps, "seed": args.seed,
        "device": None if args.device == "auto" else args.device, "train": train,
        "data_state": args.data_state, "checkpoint_every": args.checkpoint_every,
        "gradient_checkpointing": args.gradient_checkpointing, "progress": not args.quiet})
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    print(f"saved UniGenDet to {args.out} ({summary['steps']} steps, {summary['tokens']} tokens, "
          f"{summary['seconds']} s)")
    if sum(summary["skipped"].values()):
        log.warning("skipped samples %s (see %s)", summary["skipped"], os.path.join(args.out, "train_summary.json"))
    return 0


def _add_demo(sub) -> None:
    d = _command(sub, "demo", "offline end-to-end demo: build a toy set, train, evaluate", _cmd_demo, _check_demo)
    d.add_argument("--out", default="demo-out", help="folder for the toy data, config and detector")
    d.add_argument("--steps", type=_positive, default=200, help="training steps")
    d.add_argument("--vae-steps", type=_non_negative, default=60,
                   help="steps fitting the small VAE that makes the fakes (more: closer fakes, slower)")
    d.add_argument("--per-photo", type=_positive, default=40, help="crops taken from each sample photo")
    d.add_argument("--seed", type=int, default=0, help="seed for crops, VAE and training")


def _add_train(sub) -> None:
    t = _command(sub, "train", "train a MiraGe detector on a labelled folder or manifest", _cmd_train, _check_train)
    t.add_argument("data", help="folder with real/fake (or 0_real/1_fake, nature/ai) leaves, or a CSV/JSONL manifest")
    t.add_argument("--out", default="runs/mirage", help="output detector folder")
    t.add_argument("--val", help="held-out data (default: the data's val/ split if present)")
    t.add_argument("--model", default="vit-l-14", help="shipped config (tiny, vit-l-14), a JSON config, or a detector folder")
    t.add_argument("--backbone", help="open_clip model name, with --pretrained (default: ViT-L-14)")
    t.add_argument("--pretrained", help="open_clip tag (weights in the local cache) or a local checkpoint "
                   "file for the backbone (default: the model config's)")
    for name, typ, what in (("alpha", float, "weight of the SupCon loss"),
                            ("temperature", _positive_float, "SupCon temperature"),
                            ("bank-size", _positive, "memory-bank entries"),
                            ("prompt-depth", _positive, "layers with learned prompts"),
                            ("prompt-tokens", _positive, "learned tokens per layer")):
        t.add_argument(f"--{name}", type=typ, help=f"{what} (default: the model config's)")
    t.add_argument("--epochs", type=_positive, default=5, help="passes over the training data")
    t.add_argument("--max-steps", type=_positive, help="stop after this many optimiser steps (default: no limit)")
    t.add_argument("--lr", type=_positive_float, default=0.0035, help="peak learning rate (cosine schedule)")
    t.add_argument("--warmup-epochs", type=_non_negative, default=0, help="constant --warmup-lr first (MaPLe: 1)")
    t.add_argument("--warmup-lr", type=_positive_float, default=1e-5, help="MaPLe's WARMUP_CONS_LR")
    t.add_argument("--prompt-init", help='"random" or words whose first B tokens start the layer-0 text '
                   'prompts, e.g. "a photo of a" (MaPLe) (default: random)')
    t.add_argument("--resize-mode", choices=("shortest", "squash", "none"),
                   help="none = centre crop only, no resize (UnivFD-style) (default: the model config's)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run saved in OUT.partial/ (same settings and data)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing detector folder at --out when training ends")
    t.add_argument("--checkpoint-every", type=_non_negative, default=500,
                   help="optimiser steps between checkpoints in OUT.partial/ (0: only on Ctrl-C)")
    _add_runtime(t, batch_size=32)
    for action in t._actions:
        if action.dest == "batch_size":
            action.help = "images per batch (per process under torchrun)"


def _add_train_unigendet(sub) -> None:
    t = _command(sub, "train-unigendet", "train UniGenDet (GDUF or DIGA) from FakeClue conversations and "
                 "text-to-image shards; under torchrun, sharded with FSDP2", _cmd_train_unigendet,
                 _check_train_unigendet)
    t.add_argument("data", help="data config (JSON): detection (FakeClue JSON/JSONL + image_root), "
                   "generation (tar shards, parquet or t2i JSON), det_weight/gen_weight, max_tokens")
    t.add_argument("--stage", choices=("gduf", "diga"), required=True, help="GDUF (stage 1) or DIGA (stage 2)")
    t.add_argument("--out", required=True, help="output folder (model, train_log.jsonl, train_summary.json)")
    t.add_argument("--model", default="tiny", help="shipped config (tiny, bagel-7b), a saved folder or a "
                   "BAGEL base folder (under torchrun: a folder)")
    t.add_argument("--checkpoint", help="fine-tuned weights merged over a BAGEL base --model")
    t.add_argument("--preset", choices=("code", "paper"), default="code",
                   help="the released scripts' hyper-parameters, or the paper's")
    t.add_argument("--steps", type=_positive, default=1000, help="optimizer steps (packs)")
    t.add_argument("--lr", type=_positive_float, help="learning rate (default: the preset's)")
    t.add_argument("--warmup-steps", type=_non_negative, help="linear warm-up steps (default: the preset's)")
    t.add_argument("--checkpoint-every", type=_non_negative, default=0,
                   help="DCP checkpoints in OUT/checkpoints every this many steps; a rerun resumes (0: off)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    t.add_argument("--data-state", help="data_state.json of an earlier run: continue its data")
    t.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: each rank's LOCAL_RANK GPU)")
