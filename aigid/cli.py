"""``aigid demo | train | eval | scan | export | make-aligned | backends`` (the console script)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from aigid.errors import MissingHeadError  # light: no model import


def _cmd_demo(args) -> int:
    from aigid.demo import run_demo

    run_demo(out=args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    return 0


def _overrides(args) -> dict:
    keys = ("alpha", "temperature", "bank_size", "prompt_depth", "prompt_tokens")  # argparse dests
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.pretrained is not None:
        out["backbone"] = {"model": args.backbone or "ViT-L-14", "pretrained": args.pretrained}
    elif args.backbone is not None:
        raise SystemExit("--backbone needs --pretrained (an open_clip tag or a checkpoint file)")
    if args.prompt_init is not None:
        out["prompt_init"] = args.prompt_init
    if args.resize_mode is not None:
        out["preprocess"] = {"resize_mode": args.resize_mode}
    return out


def _cmd_train(args) -> int:
    from aigid.train import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, val=args.val, model=args.model,
                      overrides=_overrides(args), cache_dir=args.cache_dir, epochs=args.epochs,
                      max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                      num_workers=args.workers, device=args.device, seed=args.seed,
                      warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                      progress=not args.quiet)
    summary = train(cfg)
    print(f"saved detector to {args.out} ({summary['steps']} steps, {summary['seconds']} s)")
    if "val" in summary:
        print(json.dumps(summary["val"]["overall"], indent=2))
    if summary["skipped_files"]:
        print(f"{len(summary['skipped_files'])} unreadable files skipped (see train_summary.json)")
    return 0


def _set_verdict(detector, verdict, cmd: str) -> None:
    """``--verdict head|text`` (UniGenDet): kept in the detector's config, so the scan's run record
    and result fingerprint say which verdict produced the scores."""
    if verdict is None:
        return
    if getattr(getattr(detector, "config", None), "verdict", None) is None:
        raise SystemExit(f"aigid {cmd}: --verdict applies to UniGenDet detectors only")
    detector.config.verdict = verdict


def _cmd_eval(args) -> int:
    from aigid.evaluate import device_of, evaluate
    from aigid.models.registry import load_detector

    try:
        detector = load_detector(args.detector, cache_dir=args.cache_dir, device=str(device_of(args.device)),
                                 checkpoint=args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"aigid eval: {err}") from None
    _set_verdict(detector, args.verdict, "eval")
    try:
        result = evaluate(detector, args.data, split=args.split, batch_size=args.batch_size,
                          num_workers=args.workers, threshold=args.threshold, progress=not args.quiet,
                          robustness=args.robustness or ())
    except MissingHeadError as err:
        raise SystemExit(f"aigid eval: {err}") from None
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(json.dumps({"overall": result["overall"], "written": args.out}, indent=2))
    else:
        print(text)
    return 0


def _cmd_scan(args) -> int:
    import os

    from aigid.evaluate import device_of
    from aigid.models.registry import load_detector
    from aigid.scan import scan_to_store

    if args.batch_size < 1:
        raise SystemExit("aigid scan: --batch-size must be >= 1")
    if args.workers is not None and args.workers < 0:
        raise SystemExit("aigid scan: --workers must be >= 0")
    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:  # a typo on the command line is a usage error; unreadable files found inside are data
        raise SystemExit(f"aigid scan: no such path: {', '.join(missing)}")
    try:
        detector = load_detector(args.detector, cache_dir=args.cache_dir,
                                 device=str(device_of(args.device)), checkpoint=args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"aigid scan: {err}") from None
    _set_verdict(detector, args.verdict, "scan")
    try:
        summary = scan_to_store(args.paths, detector, out=args.out, batch_size=args.batch_size,
                                decoder=args.decoder, num_workers=args.workers,
                                resume=not args.no_resume, retry_errors=args.retry_errors,
                                threshold=args.threshold, export=args.export, progress=not args.quiet)
    except MissingHeadError as err:
        raise SystemExit(f"aigid scan: {err}") from None
    print(json.dumps(summary, indent=2))
    return 0  # unreadable images are results (stored with their reason), not a failure


def _cmd_export(args) -> int:
    import os

    from aigid.store import ResultStore

    if not os.path.isfile(args.db):
        raise SystemExit(f"aigid export: no results file {args.db!r}")
    with ResultStore(args.db) as store:
        n = store.export(args.out, format=args.format, model=args.model)
    print(json.dumps({"exported": n, "out": args.out}))
    return 0


def _cmd_make_aligned(args) -> int:
    from aigid.data.aligned import load_vae, make_aligned

    counts = make_aligned(args.real_dir, args.out_dir, load_vae(args.vae, device=args.device),
                          progress=not args.quiet)
    print(json.dumps(counts))
    return 0 if counts["written"] else 1


def _cmd_backends(args) -> int:
    from aigid import backends

    print(json.dumps(backends.available(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aigid", description="Detect AI-generated images.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline end-to-end demo: build a toy set, train, evaluate")
    d.add_argument("--out", default="aigid-demo")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    t = sub.add_parser("train", help="train a MiraGe detector on a labelled folder or manifest")
    t.add_argument("data", help="folder with real/fake (or 0_real/1_fake, nature/ai) leaves, or a CSV/JSONL manifest")
    t.add_argument("--out", default="runs/mirage", help="output detector folder")
    t.add_argument("--val", help="held-out data (default: the data's val/ split if present)")
    t.add_argument("--model", default="vit-l-14", help="shipped config (tiny, vit-l-14), a JSON config, or a detector folder")
    t.add_argument("--backbone", help="open_clip model name, with --pretrained")
    t.add_argument("--pretrained", help="open_clip tag or local checkpoint file for the backbone")
    t.add_argument("--cache-dir", help="open_clip weights cache")
    for name, typ in (("alpha", float), ("temperature", float), ("bank-size", int),
                      ("prompt-depth", int), ("prompt-tokens", int)):
        t.add_argument(f"--{name}", type=typ)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=0.0035)
    t.add_argument("--warmup-epochs", type=int, default=0, help="constant --warmup-lr first (MaPLe: 1)")
    t.add_argument("--warmup-lr", type=float, default=1e-5, help="MaPLe's WARMUP_CONS_LR")
    t.add_argument("--prompt-init", help='"random" (default) or words whose first B tokens start the '
                   'layer-0 text prompts, e.g. "a photo of a" (MaPLe)')
    t.add_argument("--resize-mode", choices=("shortest", "squash", "none"),
                   help="none = centre crop only, no resize (UnivFD-style)")
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="acc, real/fake acc, AP, AUROC, EER per generator, as JSON")
    e.add_argument("data", help="labelled folder or manifest")
    e.add_argument("--detector", required=True, help="detector folder (save_pretrained) or name")
    e.add_argument("--split", help="only images under this split folder (train/val/test)")
    e.add_argument("--out", help="write the JSON result here")
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the --detector base folder")
    e.add_argument("--verdict", choices=("head", "text"), help="UniGenDet: read the detection head "
                   "(default) or parse the generated answer as the public evaluation does (the paper's accuracy)")
    e.add_argument("--robustness", help="re-score under perturbations: 'sidbench' (JPEG 95/90/50/30, "
                   "blur sigma 2/4) or a list like jpeg90,blur2")
    e.add_argument("--cache-dir")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("scan", help="score every image under folders, tar/zip shards or file lists "
                       "into a resumable SQLite results file")
    s.add_argument("paths", nargs="+", metavar="PATH",
                   help="folder, image, .tar/.zip shard, or .txt/.lst list")
    s.add_argument("--detector", required=True, help="detector folder (save_pretrained) or name")
    s.add_argument("--out", default="results.sqlite", help="SQLite results file (created or resumed)")
    s.add_argument("--export", help="also write this model's results to a .jsonl, .csv or .parquet file")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.add_argument("--decoder", choices=("auto", "dali", "pil"), default="auto")
    s.add_argument("--workers", type=int, help="decode processes (default: all cores but one on "
                   "CUDA, few or none on CPU)")
    s.add_argument("--no-resume", action="store_true", help="rescore items already in --out")
    s.add_argument("--retry-errors", action="store_true", help="retry items stored as errors")
    s.add_argument("--threshold", type=float, default=0.5, help="label = score >= threshold")
    s.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the --detector base folder")
    s.add_argument("--verdict", choices=("head", "text"), help="UniGenDet: detection head (default) "
                   "or the generated answer's wording")
    s.add_argument("--cache-dir")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_scan)

    x = sub.add_parser("export", help="write a scan's results file as JSONL, CSV or Parquet")
    x.add_argument("db", help="SQLite results file written by `aigid scan`")
    x.add_argument("out", help="output file; the format comes from its suffix unless --format")
    x.add_argument("--format", choices=("jsonl", "csv", "parquet"))
    x.add_argument("--model", help="only this detector's results (default: all)")
    x.set_defaults(fn=_cmd_export)

    a = sub.add_parser("make-aligned", help="write VAE reconstructions (aligned fakes) of real images")
    a.add_argument("real_dir")
    a.add_argument("out_dir")
    a.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (or cached hub id)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(fn=_cmd_make_aligned)

    b = sub.add_parser("backends", help="which optional backends this machine has")
    b.set_defaults(fn=_cmd_backends)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
