"""The benchmark summary (benchmarks/_report.py): ratios, verdicts and pairing of contenders."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_report.py"
_spec = importlib.util.spec_from_file_location("bench_report", _PATH)
report = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_report", report)  # dataclasses look their module up there
_spec.loader.exec_module(report)


def _entry(case, name, ours, median, spread=0.01, budget_s=None):
    return report.Entry(case, name, ours, f"what {name} is", median, median - spread,
                        median + spread, budget_s)


def test_ratio_is_peer_over_ours_and_verdict_follows_it():
    """Catches an inverted ratio (ours / peer), which would call a 2x faster path "slower"."""
    ours, peer = _entry("c", "fast", True, 1.0), _entry("c", "slow", False, 2.0)
    assert report.verdict(ours, peer) == (2.0, "faster")
    assert report.verdict(_entry("c", "slow", True, 2.0), _entry("c", "fast", False, 1.0)) == \
        (0.5, "slower")


@pytest.mark.parametrize("peer_median, spread, expected", [
    (1.10, 0.06, "tie"),     # interquartile ranges overlap: noise, not a result
    (1.02, 0.001, "tie"),    # within the 3% band even with tight ranges
    (1.10, 0.01, "faster"),  # disjoint ranges, 10% apart
])
def test_tie_within_noise(peer_median, spread, expected):
    """Catches a verdict that ignores the spread: 3 noisy rounds must not read as a win."""
    ours = _entry("c", "a", True, 1.0, spread)
    peer = _entry("c", "b", False, peer_median, spread)
    assert report.verdict(ours, peer)[1] == expected


def test_summary_pairs_ours_with_every_peer_of_its_case_only():
    """Catches pairing across cases (comparing a CPU run with a GPU one) and lines for cases
    where one side did not run (filtered out with -k, or skipped)."""
    entries = [_entry("cpu", "scan", True, 1.0), _entry("cpu", "naive", False, 1.5),
               _entry("cpu", "other", False, 0.5), _entry("gpu", "dali", True, 0.1),
               _entry("only-ours", "x", True, 1.0)]
    lines = report.summary_lines(entries)
    pairs = [line.split()[:4] for line in lines if " vs " in line]
    assert pairs == [["cpu", "scan", "vs", "naive"], ["cpu", "scan", "vs", "other"]]
    assert "1.50x" in lines[0] and "faster" in lines[0]
    assert "0.50x" in lines[1] and "slower" in lines[1]
    assert any(line.strip().startswith("naive") and "what naive is" in line for line in lines)
    assert not any("dali" in line or "only-ours" in line for line in lines)


def test_budget_reports_extra_seconds_against_the_budget():
    """Catches a budget case (import aigid vs import torch) reported as a speed ratio or with
    the sign of the difference flipped."""
    over = report.summary_lines([_entry("import", "aigid", True, 2.0, budget_s=0.5),
                                 _entry("import", "torch", False, 1.2)])
    assert "+0.80 s over torch" in over[0] and "OVER budget" in over[0]
    ok = report.summary_lines([_entry("import", "aigid", True, 1.5, budget_s=0.5),
                               _entry("import", "torch", False, 1.2)])
    assert "+0.30 s" in ok[0] and "within budget" in ok[0]


def test_record_lands_in_extra_info_and_round_trips():
    """Catches a record the conftest hook cannot read back (a key mismatch drops every line)."""
    class Bench:
        extra_info: dict = {}

    class Stats:
        rounds, median, q1, q3 = 3, 2.0, 1.9, 2.1

    bench = Bench()
    report.record_comparison(bench, case="c", name="n", ours=True, means="m")
    entry = report.entry_from(bench.extra_info, Stats())
    assert (entry.case, entry.name, entry.ours, entry.median) == ("c", "n", True, 2.0)
    assert report.entry_from({}, Stats()) is None
