"""One comparison record per benchmark, and the closing summary built from them.

Every benchmark module calls :func:`record_comparison` once per test: which *case* it belongs to
(the contenders that ran the same workload), a short name, whether it is aigid's own path
(``ours``) or a peer's, and one line saying what the name means. ``benchmarks/conftest.py``
reads these from pytest-benchmark's results at the end of the session and prints, per case, one
line per (ours, peer) pair:

    scan-cpu-w0    scan  vs naive   1.08x  faster  | scan: aigid.scan ...; naive: DataLoader ...

The ratio is the peer's median time over ours (> 1: ours is faster). The verdict is ``tie`` when
the two interquartile ranges overlap or the medians are within ``TIE_BAND`` of each other: with
3–15 rounds on a shared machine a smaller difference is not a result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

KEY = "compare"  # the extra_info key holding the record (so it also lands in the JSON)
TIE_BAND = 0.03


def record_comparison(benchmark: Any, *, case: str, name: str, ours: bool, means: str,
                      budget_s: Optional[float] = None) -> None:
    """Tag this benchmark for the closing summary.

    ``case``: the comparison it belongs to (tests with the same case are compared with each
    other; ours against every peer). ``name``: short, as printed. ``means``: what ``name`` is, in
    a few words. ``budget_s`` (ours only): report the extra seconds over the peer against this
    budget instead of a speed ratio (for a cost that includes the peer's, like an import).
    """
    benchmark.extra_info[KEY] = {"case": case, "name": name, "ours": bool(ours), "means": means,
                                 "budget_s": budget_s}


@dataclass
class Entry:
    """One finished benchmark: its record and its timing quartiles (seconds)."""
    case: str
    name: str
    ours: bool
    means: str
    median: float
    q1: float
    q3: float
    budget_s: Optional[float] = None


def entry_from(extra_info: dict[str, Any], stats: Any) -> Optional[Entry]:
    """An ``Entry`` for a benchmark that recorded a comparison and has timings, else None."""
    record = (extra_info or {}).get(KEY)
    if not record or stats is None or not getattr(stats, "rounds", 0):
        return None
    return Entry(record["case"], record["name"], record["ours"], record["means"],
                 float(stats.median), float(stats.q1), float(stats.q3), record.get("budget_s"))


def verdict(ours: Entry, peer: Entry) -> tuple[float, str]:
    """(peer median / ours median, "faster" | "slower" | "tie") — see the module docstring."""
    ratio = peer.median / ours.median if ours.median > 0 else float("inf")
    overlap = ours.q1 <= peer.q3 and peer.q1 <= ours.q3
    if overlap or abs(ratio - 1.0) < TIE_BAND:
        return ratio, "tie"
    return ratio, "faster" if ratio > 1 else "slower"


def _budget_line(ours: Entry, peer: Entry) -> str:
    extra = ours.median - peer.median
    met = "within budget" if extra <= ours.budget_s else "OVER budget"
    return f"+{extra:.2f} s over {peer.name} (budget {ours.budget_s:.2f} s): {met}"


def summary_lines(entries: Iterable[Entry]) -> list[str]:
    """The summary: per case (in first-seen order), ours against each peer, then a legend of
    the names used in that case. Cases without both sides are left out."""
    cases: dict[str, list[Entry]] = {}
    for e in entries:
        cases.setdefault(e.case, []).append(e)
    rows: list[tuple[str, str, str]] = []
    legends: list[tuple[str, dict[str, str]]] = []
    for case, group in cases.items():
        ours = [e for e in group if e.ours]
        peers = [e for e in group if not e.ours]
        if not ours or not peers:
            continue
        for o in ours:
            for p in peers:
                if o.budget_s is not None:
                    result = _budget_line(o, p)
                else:
                    ratio, word = verdict(o, p)
                    result = f"{ratio:5.2f}x  {word}"
                rows.append((case, f"{o.name} vs {p.name}", result))
        legends.append((case, {e.name: e.means for e in group}))
    if not rows:
        return []
    w_case = max(len(r[0]) for r in rows)
    w_pair = max(len(r[1]) for r in rows)
    lines = [f"{c:<{w_case}}  {p:<{w_pair}}  {r}" for c, p, r in rows]
    lines.append("")
    lines.append("ratio = peer median time / ours (> 1: ours faster); tie = the interquartile "
                 f"ranges overlap or the medians are within {TIE_BAND:.0%}.")
    for case, names in legends:
        lines.append(f"{case}:")
        width = max(len(n) for n in names)
        lines += [f"  {n:<{width}}  {m}" for n, m in names.items()]
    return lines


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched by substring of the CUDA device
# name, most specific first. Sources: NVIDIA H100 datasheet (SXM 989.4, PCIe 756; NVL 835),
# H200 datasheet (989, same SM as H100 SXM), A100 datasheet (312), L40S datasheet (362.05),
# A10 datasheet (125), L4 datasheet (121), RTX 4090 / Ada whitepaper (165.2 with fp32 accumulate);
# the datasheets print the sparse figure too (2×) — these are half of it.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.05), ("A10", 125.0), ("L4", 121.0),
    ("RTX 4090", 165.2),
)


def bf16_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a device by name (``torch.cuda.get_device_name``), None if unknown."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def throughput_info(*, flops: float, bytes_moved: float, seconds: Optional[float],
                    device_name: str) -> dict[str, Optional[float]]:
    """``extra_info`` fields for a kernel benchmark: FLOPs, bytes, TFLOP/s, the fraction of the
    device's dense bf16 peak (None off the table or on CPU) and GB/s. ``seconds``: the median
    time of one call (None when the benchmark did not time)."""
    tflops = flops / seconds / 1e12 if seconds else None
    peak = bf16_peak_tflops(device_name)
    return {"flops": float(flops), "bytes": float(bytes_moved), "tflops": tflops,
            "gbps": bytes_moved / seconds / 1e9 if seconds else None,
            "bf16_peak_tflops": peak,
            "fraction_of_bf16_peak": tflops / peak if tflops is not None and peak else None}
