"""``aigid eval``, ``aigid calibrate`` and ``aigid make-aligned``."""
from __future__ import annotations

import json
import logging
import os

from aigid.cli.checks import (CommandFailed, UsageError, _detector_arg, _device, _labelled, _writable_dir,
                              _writable_parent)
from aigid.cli.common import (_add_allow_download, _add_detector, _add_precision, _add_runtime, _command,
                              _load_detector, _print_json, _set_verdict)

log = logging.getLogger("aigid.cli")



def _check_eval(args) -> None:
    from aigid.data.perturb import parse_sweep

    _device(args.device)
    if args.robustness:
        try:
            parse_sweep(args.robustness)
        except ValueError as err:
            raise UsageError(f"--robustness {args.robustness}: {err}") from None
    _labelled(args.data, args.split)
    if args.out:
        _writable_parent(args.out, "result file")
    if bool(args.format) != bool(args.report):
        raise UsageError("--format and --report DIR go together: the framework, and the folder its files go to")
    if args.report:
        _writable_dir(args.report, "report folder")
    if args.plots:
        _writable_dir(args.plots, "plots folder")
    _detector_arg(args.detector)


def _cmd_eval(args) -> int:
    from aigid.evaluation.runner import evaluate

    detector = _load_detector(args)
    _set_verdict(detector, args.verdict)
    result = evaluate(detector, args.data, split=args.split, batch_size=args.batch_size,
                      num_workers=args.workers, threshold=args.threshold, progress=not args.quiet,
                      robustness=args.robustness or (), plots_dir=args.plots)
    if args.format:
        from aigid.evaluation.formats import write_report
        written = write_report(result, args.report, args.format)
        log.info("wrote %d %s result files under %s", len(written), args.format, args.report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        _print_json({"overall": result["overall"], "written": args.out})
    else:
        _print_json(result)
    return 0


def _check_calibrate(args) -> None:
    _device(args.device)
    _detector_arg(args.detector)
    ours = os.path.isfile(os.path.join(args.detector, "config.json"))
    if args.out is None and (args.checkpoint or not ours):
        raise UsageError(f"{args.detector}: calibrate stores into a folder written by save_pretrained; "
                         f"give --out DIR for a name, a base/release folder or --checkpoint")
    if args.target_fpr is not None and not 0 <= args.target_fpr < 1:
        raise UsageError(f"--target-fpr {args.target_fpr}: must be in [0, 1)")
    _labelled(args.data, args.split)
    if args.out:
        _writable_dir(args.out, "detector folder")


def _cmd_calibrate(args) -> int:
    from aigid.evaluation.runner import calibrate
    from aigid.models.calibration import save_calibration
    from aigid.models.card import refresh_card_calibration

    detector = _load_detector(args)
    report = calibrate(detector, args.data, split=args.split, method=args.method,
                       target_fpr=args.target_fpr, balanced=args.balanced,
                       batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    if args.out:
        detector.save_pretrained(args.out)
        written = args.out
    else:
        written = save_calibration(args.detector, report["calibration"])  # config.json only, atomically
        refresh_card_calibration(args.detector, detector)  # keeps the card's training summary
    log.info("stored %s calibration, threshold %.4g (%s) in %s", report["method"], report["threshold"],
             report["rule"], written)
    _print_json({**{k: v for k, v in report.items() if k != "calibration"}, "written": str(written)})
    return 0


def _precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    wrong = [p for p in names if p not in ("bf16", "int8")]
    if wrong or not names:
        raise UsageError(f"--precisions {text}: a list of bf16 and/or int8, e.g. bf16,int8")
    return names


def _check_agreement(args) -> None:
    args.precisions = _precisions(args.precisions)
    if args.device not in ("cpu", "auto"):
        raise UsageError(f"--device {args.device}: agreement is measured on a CPU, where bf16/int8 weights run")
    args.device = "cpu"
    _detector_arg(args.detector)
    ours = os.path.isfile(os.path.join(args.detector, "config.json"))
    if args.out is None and not ours:
        raise UsageError(f"{args.detector}: the record goes into a folder written by save_pretrained; "
                         "give --out FILE for a name or a release folder")
    _labelled(args.data, args.split)
    if args.out:
        _writable_parent(args.out, "record file")


def _cmd_agreement(args) -> int:
    from aigid.evaluation.agreement import measure
    from aigid.models.card import refresh_card_precision
    from aigid.models.precision_record import bf16_verdict, record_path, write_record

    args.precision = "fp32"  # the reference; each other precision scores a copy
    detector = _load_detector(args)
    try:
        record = measure(detector, args.data, split=args.split, precisions=args.precisions,
                         batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    except (ImportError, ValueError) as err:  # int8 without ONNX Runtime, or for UniGenDet
        raise CommandFailed(f"{args.detector}: {err}") from None
    written = record_path(args.out or args.detector)
    record = write_record(written, record)  # with what an earlier run measured on the same weights
    if not args.out:
        refresh_card_precision(args.detector, detector, record)
    agrees, why = bf16_verdict(record, record["model_id"])  # measured on this very detector
    log.info("wrote %s; auto on a CPU with bf16 instructions: %s (%s)", written, "bf16" if agrees else "fp32", why)
    _print_json({"precisions": record["precisions"], "compared": record["compared"],
                 "auto_cpu_bf16": agrees, "written": str(written)})
    return 0


def _check_make_aligned(args) -> None:
    if not os.path.isdir(args.real_dir):
        raise UsageError(f"{args.real_dir}: no such folder of real images")
    _device(args.device)
    _writable_dir(args.out_dir, "output folder")


def _cmd_make_aligned(args) -> int:
    from aigid.data.aligned import load_vae, make_aligned

    counts = make_aligned(args.real_dir, args.out_dir,
                          load_vae(args.vae, device=args.device, download=args.allow_download),
                          progress=not args.quiet)
    print(json.dumps(counts))
    if not counts["written"]:
        raise CommandFailed(f"{args.real_dir}: no image could be reconstructed "
                            f"({counts['errors']} unreadable, see {os.path.join(args.out_dir, 'errors.jsonl')})")
    return 0


def _add_eval(sub) -> None:
    e = _command(sub, "eval", "acc, real/fake acc, AP, AUROC, EER per generator, as JSON", _cmd_eval, _check_eval)
    e.add_argument("data", help="labelled folder or manifest")
    _add_detector(e)
    e.add_argument("--split", help="only images under this split folder, e.g. train/val/test (default: all)")
    e.add_argument("--out", help="write the full JSON result here (default: print it)")
    e.add_argument("--verdict", choices=("head", "text"), help="UniGenDet: read the detection head "
                   "(default) or parse the generated answer as the public evaluation does (the paper's accuracy)")
    e.add_argument("--format", choices=("sidbench", "univfd", "deepfakebench"),
                   help="also write the results as that framework does, into --report (clean numbers in "
                   "DIR, each --robustness perturbation in DIR/<name>)")
    e.add_argument("--report", metavar="DIR", help="folder for --format's files")
    e.add_argument("--plots", metavar="DIR", help="write roc.png and reliability.png here "
                   "(pip install 'aigid[plots]')")
    e.add_argument("--robustness", help="re-score under perturbations: 'sidbench' (JPEG 95/90/50/30, "
                   "blur sigma 2/4) or a list like jpeg90,blur2 (default: none)")
    _add_runtime(e, batch_size=64)
    _add_precision(e)


def _add_calibrate(sub) -> None:
    c = _command(sub, "calibrate", "fit calibrated P(fake) and a threshold on a labelled held-out split; "
                 "stored in the detector's config (predict, scan and eval use them)", _cmd_calibrate,
                 _check_calibrate)
    c.add_argument("detector", help="detector folder (save_pretrained)")
    c.add_argument("data", help="labelled folder or manifest")
    c.add_argument("--split", default="val", help="held-out split folder (never the training one)")
    c.add_argument("--method", choices=("temperature", "isotonic"), default="temperature",
                   help="temperature scaling or isotonic regression")
    rule = c.add_mutually_exclusive_group()
    rule.add_argument("--target-fpr", type=float,
                      help="threshold: the smallest with FPR on the reals <= this, e.g. 0.01 (default: 0.5)")
    rule.add_argument("--balanced", action="store_true", help="threshold: best balanced accuracy")
    c.add_argument("--out", help="save the calibrated detector here instead of updating DETECTOR/config.json")
    c.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the base folder (needs --out)")
    _add_runtime(c, batch_size=64)


def _add_agreement(sub) -> None:
    a = _command(sub, "agreement", "how far bf16/int8 scores stray from fp32 on a labelled held-out split "
                 "(max |dP|, verdict flips, dAUROC); stored in the detector's precision.json, where "
                 "--precision auto looks before it picks bf16 on a CPU", _cmd_agreement, _check_agreement)
    a.add_argument("detector", help="detector folder (save_pretrained)")
    a.add_argument("data", help="labelled folder or manifest (at least 200 images to decide auto)")
    a.add_argument("--split", default="val", help="held-out split folder (never the training one)")
    a.add_argument("--precisions", default="bf16", help="which to compare with fp32: bf16, int8 or bf16,int8")
    a.add_argument("--out", help="write the record here instead of DETECTOR/precision.json")
    a.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the base folder")
    _add_runtime(a, batch_size=32)


def _add_make_aligned(sub) -> None:
    a = _command(sub, "make-aligned", "write VAE reconstructions (aligned fakes) of real images",
                 _cmd_make_aligned, _check_make_aligned)
    a.add_argument("real_dir", help="folder of real images (searched recursively)")
    a.add_argument("out_dir", help="where the reconstructions go, same layout, as PNG")
    a.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (or cached hub id)")
    a.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    _add_allow_download(a)
