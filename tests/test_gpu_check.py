"""benchmarks/gpu_check.sh --dry-run on a CPU: what a GPU machine would run, and where it writes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_dry_run_lists_gpu_tests_and_benchmark_grid():
    """Catches a script that runs (or needs CUDA) under --dry-run, drops the gpu tests or a
    kernel benchmark, or writes JSON not named after the device."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DEVICE="NVIDIA H100 80GB HBM3")
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    runs = [l for l in lines if l.startswith("would run: ")]
    assert any("-m gpu tests" in l for l in runs)
    bench = [l for l in runs if "--benchmark-only" in l]
    assert len(bench) == 1
    for module in ("benchmarks/test_supcon_bank.py", "benchmarks/test_smsa_attention.py"):
        assert module in bench[0]
    out = [l for l in lines if l.startswith("would write: ")][0]
    assert "benchmarks/results/NVIDIA-H100-80GB-HBM3-" in out and out.endswith(".json")
    assert f"--benchmark-json={out.removeprefix('would write: ')}" in bench[0]
