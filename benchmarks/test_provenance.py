"""What reading provenance evidence costs the CPU scan: goal <= 5% on JPEGs without metadata.

The same 64 in-memory photo-like 512x384 JPEGs (q90, no EXIF/XMP/C2PA: the common case, where
the reader walks the marker segments up to the first scan and finds nothing) go through
  - ``decode``: ``decode_image`` with the scan's eval transform (decode + resize + crop +
    normalise to 224 px), the per-image work of a CPU scan's worker;
  - ``decode+evidence``: the same plus ``evidence_json`` (what a worker runs with
    ``evidence=True``); the summary line reports its extra seconds against a budget of 5% of
    ``decode`` (measured once before the rounds);
  - ``evidence``: ``evidence_json`` alone; ``extra_info["fraction_of_decode"]`` is its median
    over ``decode``'s, the number the goal is about.
``decode`` is a lower bound of scan time (the model is left out), so the fraction is an upper
bound of the cost in a scan.

    pytest benchmarks/test_provenance.py --benchmark-only
"""
from __future__ import annotations

import os
import statistics
import time

import pytest

from aigid.data.decode_cpu import decode_image
from aigid.data.transforms import eval_transform
from aigid.provenance import evidence_json

from _images import photo_like_jpeg
from _report import record_comparison

PP = {"size": 224, "resize_mode": "shortest", "interpolation": "bicubic",
      "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
W, H, N = 512, 384, 64
GOAL = 0.05
_MEDIANS: dict[str, float] = {}
MEANS = {"decode": "decode_image + eval transform per JPEG (a CPU scan worker's work)",
         "decode+evidence": "the same plus evidence_json on the same bytes",
         "evidence": "evidence_json alone"}


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    data = [photo_like_jpeg(i, W, H) for i in range(N)]
    assert all(evidence_json(d) == '{"provenance":"none"}' for d in data)
    return data


@pytest.fixture(scope="module")
def transform():
    return eval_transform(PP)


@pytest.fixture(scope="module")
def decode_reference(jpegs, transform) -> float:
    """Median seconds of one decode pass, measured before the rounds (for the budget)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for d in jpegs:
            decode_image(d, transform)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else "n/a"


@pytest.mark.parametrize("impl", ["decode", "decode+evidence", "evidence"])
def test_provenance_cost(benchmark, jpegs, transform, decode_reference, impl):
    benchmark.group = f"evidence cost, {N} JPEG {W}x{H} without metadata, cpu"

    def run() -> None:
        for d in jpegs:
            if impl != "evidence":
                decode_image(d, transform)
            if impl != "decode":
                evidence_json(d)

    rounds = 15 if impl == "evidence" else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing timed
        return
    median = benchmark.stats.stats.median
    _MEDIANS[impl] = median
    if impl != "evidence":
        record_comparison(benchmark, case="provenance-cost", name=impl, ours=impl != "decode",
                          means=MEANS[impl],
                          budget_s=GOAL * decode_reference if impl != "decode" else None)
    benchmark.extra_info.update({"impl": impl, "images": N,
                                 "per_image_us": round(1e6 * median / N, 2),
                                 "decode_reference_s": round(decode_reference, 4),
                                 "cpus": os.cpu_count(), "load": _load()})
    if impl == "evidence":
        fraction = median / _MEDIANS.get("decode", decode_reference)
        benchmark.extra_info.update({"fraction_of_decode": round(fraction, 5), "goal": GOAL,
                                     "within_goal": fraction <= GOAL})
