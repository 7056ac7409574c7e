"""``aigid serve DETECTOR``: the detector behind HTTP (``pip install 'aigid[serve]'``)."""
from __future__ import annotations

import importlib.util

from aigid.cli.checks import UsageError, _detector_arg, _device, _float_in, _non_negative, _positive, _probability
from aigid.cli.common import _add_allow_download, _add_precision, _command, _load_detector

SERVE_PACKAGES = ("starlette", "uvicorn", "prometheus_client", "python_multipart")


def _port(text: str) -> int:
    import argparse

    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {text!r}")
    return value


def _check_serve(args) -> None:
    missing = [m for m in SERVE_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serving needs {', '.join(missing)}: pip install 'aigid[serve]'")
    _device(args.device)
    _detector_arg(args.detector)


def _cmd_serve(args) -> int:
    from aigid.serving.http import ServeOptions, serve

    options = ServeOptions(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                           max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           max_image_bytes=args.max_image_bytes, max_files=args.max_files,
                           threshold=args.threshold, decode_workers=args.decode_workers,
                           evidence=not args.no_evidence)
    serve(lambda: _load_detector(args), options, name=args.detector)
    return 0


def _add_serve(sub) -> None:
    s = _command(sub, "serve", "score images over HTTP (POST /v1/score; /healthz, /readyz, /metrics) with "
                 "dynamic batching", _cmd_serve, _check_serve)
    s.add_argument("detector", metavar="DETECTOR", help="detector folder (save_pretrained) or name")
    s.add_argument("--checkpoint", help="UniGenDet: fine-tuned weights merged over the DETECTOR base folder")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (beyond loopback only when given: e.g. 0.0.0.0)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--max-batch-size", type=_positive, default=32, help="images per model forward at most")
    s.add_argument("--max-wait-ms", type=_float_in(0.0), default=5.0,
                   help="how long a batch's first image waits for others: more fills batches "
                   "(throughput) at up to that much added latency under light load")
    s.add_argument("--max-queue", type=_positive, default=256,
                   help="images waiting at most; beyond it requests get 503 + Retry-After")
    s.add_argument("--max-image-bytes", type=_positive, default=20 << 20,
                   help="largest image accepted (413 beyond, refused from Content-Length before reading)")
    s.add_argument("--max-files", type=_positive, default=16, help="images per multipart request at most")
    s.add_argument("--threshold", type=_probability, default=None,
                   help="label = fake when p_fake > threshold (default: the detector's stored threshold, else 0.5)")
    s.add_argument("--decode-workers", type=_non_negative, default=None, help="decode threads (default: 2)")
    s.add_argument("--no-evidence", action="store_true",
                   help="do not read provenance evidence (C2PA, IPTC/XMP, generator metadata)")
    s.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    s.add_argument("--cache-dir", help="where open_clip tag weights are looked up")
    _add_allow_download(s)
    _add_precision(s)
