"""Import cost: ``python -c "import aigid"`` vs ``python -c "import torch"``, fresh interpreters.

The goal (issue "Behaves in production", tightened by the layout issue): ``import aigid`` costs at
most 0.1 s more than torch alone, so a pipeline that embeds aigid does not pay for torchvision's model zoo, torch._dynamo,
open_clip or Triton until it uses them. Each round starts a new interpreter (warm OS caches);
``extra_info`` records both medians and the difference.

    pytest benchmarks/test_import.py --benchmark-only
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

from _report import record_comparison

ROUNDS = 5
GOAL_EXTRA_S = 0.1  # import aigid may cost this much more than import torch


def _time_import(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - started


@pytest.mark.parametrize("module", ["torch", "aigid"])
def test_import_time(benchmark, module):
    _time_import(module)  # warm the OS file cache
    benchmark.pedantic(_time_import, args=(module,), rounds=ROUNDS, iterations=1)
    record_comparison(benchmark, case="import", name=module, ours=module == "aigid",
                      means=f"python -c 'import {module}', fresh interpreter",
                      budget_s=GOAL_EXTRA_S if module == "aigid" else None)
    other = "torch" if module == "aigid" else None
    if other is not None:
        torch_s = statistics.median(_time_import("torch") for _ in range(ROUNDS))
        aigid_s = statistics.median(benchmark.stats.stats.data)
        benchmark.extra_info.update(torch_s=round(torch_s, 3), aigid_s=round(aigid_s, 3),
                                    extra_over_torch_s=round(aigid_s - torch_s, 3), goal_extra_s=GOAL_EXTRA_S)
