"""`aigid train-unigendet` end to end: one process, and under torchrun (2 gloo ranks on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from aigid.cli import main
from aigid.models.unigendet import UniGenDet, UniGenDetConfig
from fakeclue_samples import fakeclue_row, noise_png, write_tar

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ugd")
    (root / "images").mkdir()
    for i in range(8):
        (root / "images" / f"d{i}.png").write_bytes(noise_png(32, 32, i))
    (root / "det.jsonl").write_text("\n".join(json.dumps(fakeclue_row(f"d{i}.png", i % 2)) for i in range(8)))
    members = []
    for i in range(8):
        members += [(f"p/s{i:03d}.png", noise_png(32, 32, 100 + i)), (f"p/s{i:03d}.txt", f"caption {i}".encode())]
    write_tar(root / "gen.tar", members)
    (root / "data.json").write_text(json.dumps({
        "detection": {"path": "det.jsonl", "image_root": "images"}, "generation": {"path": "gen.tar"},
        "det_weight": 1, "gen_weight": 1, "mix": "paired", "max_tokens": 400}))
    UniGenDet(UniGenDetConfig.named("tiny"), seed=0).save_pretrained(root / "base")
    return root


def test_cli_trains_one_process_and_refuses_a_missing_model(setup, tmp_path, capsys):
    """Catches the CLI dropping --stage/--steps on the way to the runner, and a typo in --model
    reaching the loader as a traceback instead of one usage line."""
    out = tmp_path / "o"
    assert main(["train-unigendet", str(setup / "data.json"), "--stage", "gduf", "--out", str(out),
                 "--model", str(setup / "base"), "--steps", "2", "--warmup-steps", "0", "--quiet"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    assert main(["train-unigendet", str(setup / "data.json"), "--stage", "gduf", "--out", str(out),
                 "--model", str(setup / "nope"), "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err


def test_torchrun_two_ranks_train_shard_and_export_a_loadable_model(setup, tmp_path):
    """Catches the runner's torchrun path never sharding or never exporting (no folder, or one
    that does not load), every rank writing logs, or ranks reading the same data (the log would
    count one rank's samples only)."""
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AIGID_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "aigid.cli",
           "train-unigendet", str(setup / "data.json"), "--stage", "gduf", "--out", str(out), "--model",
           str(setup / "base"), "--steps", "2", "--warmup-steps", "0", "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes the log
    loaded = UniGenDet.from_pretrained(str(out))
    start = UniGenDet.from_pretrained(str(setup / "base"))
    assert not torch.equal(loaded.fake_cls_head[1].weight, start.fake_cls_head[1].weight)  # it trained
