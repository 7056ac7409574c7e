"""Benchmark-session defaults and the closing "ours vs peers" summary.

pytest-benchmark's tables stay available; by default they show three columns (median, IQR,
rounds) instead of ten — pass ``--benchmark-columns=...`` for others. After the tables, one line
per comparison that the modules recorded with ``_report.record_comparison``.
"""
from __future__ import annotations

import pytest

from _report import entry_from, summary_lines

DEFAULT_COLUMNS = ["median", "iqr", "rounds"]


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own configure reads the option
def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "benchmark_columns", "absent") is None:  # the user passed none
        config.option.benchmark_columns = list(DEFAULT_COLUMNS)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark has printed its tables
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", False):
        return
    entries = [e for e in (entry_from(b.extra_info, b.stats) for b in session.benchmarks
                           if not b.has_error) if e is not None]
    lines = summary_lines(entries)
    if not lines:
        return
    terminalreporter.write_sep("-", "summary: ours vs peers (same run)")
    for line in lines:
        terminalreporter.write_line(line)
