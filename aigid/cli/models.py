"""``aigid export-model`` and ``aigid backends``."""
from __future__ import annotations

import json

from aigid.cli.checks import UsageError, _detector_arg, _writable_parent
from aigid.cli.common import _add_allow_download, _command, _load_detector, _print_json


def _check_export_model(args) -> None:
    _detector_arg(args.detector)
    _writable_parent(args.out, "exported model")


def _cmd_export_model(args) -> int:
    from aigid.export.onnx import export_model

    detector = _load_detector(args)
    try:
        path = export_model(detector, args.out, format=args.format)
    except NotImplementedError as err:
        raise UsageError(str(err)) from None
    _print_json({"exported": str(path), "format": args.format})
    return 0


def _cmd_backends(args) -> int:
    from aigid import backends
    from aigid.models.precision import auto_choice

    print(json.dumps({**backends.available(), "precision_auto": auto_choice()}, indent=2))
    return 0


def _add_export_model(sub) -> None:
    m = _command(sub, "export-model", "export a MiraGe detector as ONNX or a torch.export program "
                 "(preprocessed pixels in, P(fake) out)", _cmd_export_model, _check_export_model)
    m.add_argument("detector", help="detector folder (save_pretrained) or name")
    m.add_argument("out", help="output file (.onnx or .pt2)")
    m.add_argument("--format", choices=("onnx", "torch-export"), default="onnx", help="export format")
    m.add_argument("--device", default="cpu", help="where the detector is loaded for export")
    m.add_argument("--cache-dir", help="where open_clip tag weights are looked up")
    _add_allow_download(m)
    m.set_defaults(checkpoint=None)
