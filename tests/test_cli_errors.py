"""Ordinary CLI mistakes: one stderr line ``aigid <cmd>: ...`` naming the path, exit 2 (usage) or 1
(runtime), no traceback unless ``--debug``; plus ``--version``, ``--quiet``, rounding, ``| head``."""
import json
import logging
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import aigid
from aigid import backends, cli
from aigid.scanning.store import ResultRow, ResultStore


def _images(root, splits=("train",), n=2):
    rng = np.random.default_rng(0)
    for split in splits:
        for label in ("real", "fake"):
            os.makedirs(root / split / label, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A saved tiny MiraGe (random backbone stored beside it): enough for load and scan paths."""
    from aigid.models.mirage import MiraGe, MiraGeConfig

    out = tmp_path_factory.mktemp("det") / "tiny"
    MiraGe(MiraGeConfig.named("tiny"), seed=0).save_pretrained(out)
    return out


def _run(argv):
    """main() in-process: (exit code, stdout, stderr) whether it returns or raises SystemExit."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


# ---- the table: (id, setup(tmp) -> (argv, the path or option the message must name), exit code) ----
def _empty_folder(t):
    os.makedirs(t / "empty")
    return ["train", t / "empty", "--model", "tiny", "--out", t / "o"], t / "empty"


def _missing_folder(t):
    return ["train", t / "nope", "--model", "tiny", "--out", t / "o"], t / "nope"


def _split_matches_nothing(t):
    _images(t / "d", splits=("train",), n=3)
    return ["eval", t / "d", "--detector", t / "det", "--split", "val"], t / "d"


def _corrupt_safetensors(t):
    os.makedirs(t / "det")
    (t / "det" / "config.json").write_text("{}")
    (t / "det" / "model.safetensors").write_bytes(os.urandom(256))
    _images(t / "d")
    return ["eval", t / "d", "--detector", t / "det"], t / "det" / "model.safetensors"


def _random_config(t):
    os.makedirs(t / "det")
    (t / "det" / "config.json").write_bytes(bytes(range(256)) * 2)
    _images(t / "d")
    return ["scan", t / "d", "--detector", t / "det", "--out", t / "r.sqlite"], t / "det" / "config.json"


def _out_under_a_file(t):
    _images(t / "d")
    (t / "plain").write_text("x")
    return ["eval", t / "d", "--detector", t / "det", "--out", t / "plain" / "m.json"], t / "plain" / "m.json"


def _out_parent_missing(t):
    _images(t / "d")
    return ["scan", t / "d", "--detector", t / "det", "--out", t / "no" / "r.sqlite"], t / "no" / "r.sqlite"


def _read_only_out(t):
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions (the file-as-parent row covers the check)")
    _images(t / "d")
    os.makedirs(t / "ro")
    os.chmod(t / "ro", 0o555)
    return ["train", t / "d", "--model", "tiny", "--out", t / "ro" / "det"], t / "ro" / "det"


def _train_out_is_under_a_file(t):
    _images(t / "d")
    (t / "plain").write_text("x")
    return ["train", t / "d", "--model", "tiny", "--out", t / "plain" / "det"], t / "plain" / "det"


def _threshold_7(t):
    _images(t / "d")
    return ["eval", t / "d", "--detector", t / "det", "--threshold", "7"], "--threshold"


def _epochs_0(t):
    _images(t / "d")
    return ["train", t / "d", "--model", "tiny", "--epochs", "0", "--out", t / "o"], "--epochs"


def _negative_epochs(t):
    _images(t / "d")
    return ["train", t / "d", "--model", "tiny", "--epochs", "-3", "--out", t / "o"], "--epochs"


def _cuda_without_gpu(t):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _images(t / "d")
    return ["train", t / "d", "--model", "tiny", "--device", "cuda", "--out", t / "o"], "--device cuda"


def _robustness_foo(t):
    _images(t / "d")
    return ["eval", t / "d", "--detector", t / "det", "--robustness", "foo"], "'foo'"


def _parquet_without_pyarrow(t):
    ResultStore(t / "r.sqlite").close()
    return ["export", t / "r.sqlite", t / "out.parquet"], t / "out.parquet"


def _non_checkpoint_pretrained(t):
    _images(t / "d")
    (t / "weights.bin").write_bytes(b"definitely not a checkpoint" * 10)
    return ["train", t / "d", "--model", "tiny", "--pretrained", t / "weights.bin", "--out", t / "o"], \
        t / "weights.bin"


def _corrupt_results_export(t):
    (t / "r.sqlite").write_bytes(os.urandom(4096))
    return ["export", t / "r.sqlite", t / "out.jsonl"], t / "r.sqlite"


def _corrupt_results_scan(t):
    _images(t / "d")
    (t / "r.sqlite").write_bytes(os.urandom(4096))
    return ["scan", t / "d", "--detector", t / "det", "--out", t / "r.sqlite"], t / "r.sqlite"


def _missing_results(t):
    return ["export", t / "nothing.sqlite", t / "out.jsonl"], t / "nothing.sqlite"


def _scan_missing_path(t):
    return ["scan", t / "typo", "--detector", t / "det", "--out", t / "r.sqlite"], t / "typo"


def _unknown_export_suffix(t):
    ResultStore(t / "r.sqlite").close()
    return ["export", t / "r.sqlite", t / "out.xlsx"], t / "out.xlsx"


def _single_class(t):
    os.makedirs(t / "d" / "real")
    Image.new("RGB", (8, 8)).save(t / "d" / "real" / "a.png")
    return ["train", t / "d", "--model", "tiny", "--out", t / "o"], t / "d"


def _ray_with_local_only_flag(t):
    _images(t / "d")
    return ["scan", t / "d", "--detector", t / "det", "--ray", "local", "--decoder", "pil",
            "--out", t / "r.sqlite"], "--decoder"


ROWS = [
    ("empty-folder", _empty_folder, 2),
    ("missing-folder", _missing_folder, 2),
    ("split-matches-nothing", _split_matches_nothing, 2),
    ("corrupt-safetensors", _corrupt_safetensors, 1),
    ("random-config-json", _random_config, 1),
    ("out-under-a-file", _out_under_a_file, 2),
    ("out-parent-missing", _out_parent_missing, 2),
    ("read-only-out", _read_only_out, 2),
    ("train-out-under-a-file", _train_out_is_under_a_file, 2),
    ("threshold-7", _threshold_7, 2),
    ("epochs-0", _epochs_0, 2),
    ("epochs-negative", _negative_epochs, 2),
    ("cuda-without-gpu", _cuda_without_gpu, 2),
    ("robustness-foo", _robustness_foo, 2),
    ("parquet-without-pyarrow", _parquet_without_pyarrow, 2),
    ("non-checkpoint-pretrained", _non_checkpoint_pretrained, 1),
    ("corrupt-results-export", _corrupt_results_export, 1),
    ("corrupt-results-scan", _corrupt_results_scan, 1),
    ("missing-results", _missing_results, 2),
    ("scan-missing-path", _scan_missing_path, 2),
    ("unknown-export-suffix", _unknown_export_suffix, 2),
    ("single-class", _single_class, 2),
    ("ray-with-local-only-flag", _ray_with_local_only_flag, 2),
]


@pytest.mark.parametrize("setup,code", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_mistake_gets_one_line(setup, code, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    argv, path = setup(tmp_path)
    capsys.readouterr()
    assert _run(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"aigid {argv[0]}: "), err
    assert "Traceback" not in err and "weights_only" not in err
    assert str(path) in lines[0], err


def test_split_message_counts_images_outside_it(tmp_path, capsys):
    _images(tmp_path / "d", splits=("train", "test"), n=3)
    assert _run(["eval", tmp_path / "d", "--detector", tmp_path / "x", "--split", "val"]) == 2
    assert "12 exist outside" in capsys.readouterr().err


def test_moved_local_backbone_names_the_missing_file(tiny_detector, tmp_path, capsys):
    det = tmp_path / "det"  # a copy whose config points at a backbone file that has moved
    os.makedirs(det)
    for name in os.listdir(tiny_detector):
        os.symlink(tiny_detector / name, det / name)
    config = json.loads((tiny_detector / "config.json").read_text())
    config["backbone"].pop("weights_file", None)
    config["backbone"]["pretrained"] = str(tmp_path / "was-here" / "clip.safetensors")
    os.remove(det / "config.json")
    (det / "config.json").write_text(json.dumps(config))
    _images(tmp_path / "d")
    assert _run(["eval", tmp_path / "d", "--detector", det, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aigid eval: ")
    assert str(tmp_path / "was-here" / "clip.safetensors") in err[0]


def test_unpickling_error_never_suggests_weights_only():
    # torch's own message advises weights_only=False; what we print must not pass that on
    code, msg = cli._describe(pickle.UnpicklingError("Weights only load failed ... set weights_only=False"))
    assert code == 1 and "weights_only" not in msg


def test_unexpected_exception_is_one_line_with_a_hint():
    code, msg = cli._describe(TypeError("boom\nsecond line"))
    assert code == 1 and "--debug" in msg
    assert "\n" not in cli._one_line(msg)


def test_version(capsys):
    assert _run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"aigid {aigid.__version__}"


def test_every_option_has_help():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"aigid {name} {action.option_strings or action.dest} has no help"
    text = subs["train"].format_help()
    assert "(default: 5)" in text and "(default: runs/mirage)" in text and "(default: 0)" in text


def test_quiet_and_debug_go_before_or_after_the_command():
    parse = cli.build_parser().parse_args
    assert getattr(parse(["--quiet", "backends"]), "quiet", False)
    assert getattr(parse(["backends", "--quiet"]), "quiet", False)
    assert not getattr(parse(["backends"]), "quiet", False)
    assert getattr(parse(["--debug", "backends"]), "debug", False)


def test_quiet_silences_backend_announcements(monkeypatch, capsys):
    monkeypatch.setenv("AIGID_QUIET", "0")
    monkeypatch.setattr(backends, "_announced", {})
    with cli._notices(quiet=False):
        backends.announce("supcon", "reference")
    assert "aigid: supcon=reference" in capsys.readouterr().err
    monkeypatch.setattr(backends, "_announced", {})
    with cli._notices(quiet=True):
        backends.announce("supcon", "reference")
        logging.getLogger("aigid.x").warning("still shown")
    err = capsys.readouterr().err
    assert "supcon" not in err and "still shown" in err
    monkeypatch.setenv("AIGID_QUIET", "1")  # the env switch still silences the announcement itself
    monkeypatch.setattr(backends, "_announced", {})
    with cli._notices(quiet=False):
        backends.announce("supcon", "reference")
    assert "supcon" not in capsys.readouterr().err


def test_scan_of_nothing_notes_it_and_eval_rounds(tiny_detector, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert _run(["scan", tmp_path / "empty", "--detector", tiny_detector, "--out", tmp_path / "r.sqlite",
                 "--quiet"]) == 0
    assert "no images found under" in capsys.readouterr().err
    _images(tmp_path / "d", n=3)
    assert _run(["eval", tmp_path / "d", "--detector", tiny_detector, "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)

    def floats(v):
        if isinstance(v, float):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from floats(x)
        elif isinstance(v, list):
            for x in v:
                yield from floats(x)
    values = list(floats(printed["overall"]))
    assert values and all(round(v, 4) == v for v in values)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "aigid.cli", *map(str, args)], stderr=subprocess.PIPE,
                            text=True, **kw)


def test_closed_stdout_exits_quietly(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.write(ResultRow(f"img{i}.png", "m", None, 1, 0.5, None, None, time.time()) for i in range(2000))
    proc = _cli("export", tmp_path / "r.sqlite", "/dev/stdout", "--format", "jsonl", stdout=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, as after `| head`
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == cli.EXIT_BROKEN_PIPE
    assert err.strip() == "", err


def test_debug_shows_the_traceback(tmp_path):
    proc = _cli("--debug", "train", tmp_path / "nope", stdout=subprocess.DEVNULL)
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("aigid train: ")
