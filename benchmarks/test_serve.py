"""Serving: (a) ``predict``'s peak memory against the number of items (bounded batches vs the whole
list as one batch, today's behaviour before this change); (b) closed-loop load at 1/8/32
concurrent clients against ``aigid serve`` (dynamic batching) and against the naive server
(``_naive_server.py``: one ``predict`` per request) — throughput, p50/p99 latency, mean batch
size; every request answered once, none lost. CPU, MiraGe at ViT-B/32 with random weights.

    pytest benchmarks/test_serve.py --benchmark-only -s
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _images import photo_like_jpeg, write_photo_jpegs
from _report import record_comparison

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

HERE = Path(__file__).resolve().parent
REQUESTS = 128
ROUNDS = 2


@pytest.fixture(scope="module")
def vit_b32_folder(tmp_path_factory):
    from aigid.models.mirage import MiraGe, MiraGeConfig

    config = MiraGeConfig.named("vit-l-14")
    config.backbone = {"model": "ViT-B-32", "pretrained": None}  # random weights: speed and memory only
    folder = tmp_path_factory.mktemp("vitb32") / "det"
    MiraGe(config, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return write_photo_jpegs(tmp_path_factory.mktemp("jpegs"))


# ---- (a) predict's peak RSS against the number of items -------------------------------------
RSS_PROBE = textwrap.dedent("""
    import json, os, sys, threading, time
    from aigid.models.registry import load_detector
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():  # current resident set (ru_maxrss would keep the peak of building the model)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    folder, images, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    detector = load_detector(folder)
    paths = [f"{images}/{i % 64}.jpg" for i in range(n)]
    detector.predict(paths[:2])  # warm: allocator and oneDNN caches are not what we measure
    base, peak, done = rss(), [0], False
    def watch():
        while not done:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    scores = detector.predict(paths, batch_size=batch)
    done = True
    watcher.join()
    print(json.dumps({"peak_extra_mb": (peak[0] - base) / 2**20, "n": len(scores)}))
""")


@pytest.mark.parametrize("n", [64, 256])
@pytest.mark.parametrize("mode", ["bounded", "one-batch"])
def test_predict_peak_rss(benchmark, vit_b32_folder, jpeg_folder, n, mode):
    batch = 32 if mode == "bounded" else n
    result = {}

    def run():
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(vit_b32_folder), str(jpeg_folder), str(n),
                              str(batch)], check=True, capture_output=True, text=True)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.group = f"predict-rss-n{n}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    assert result["n"] == n
    benchmark.extra_info.update(peak_extra_mb=round(result["peak_extra_mb"], 1), batch_size=batch)
    print(f"\npredict n={n} {mode} (batch {batch}): peak RSS +{result['peak_extra_mb']:.0f} MB")


# ---- (b) closed-loop load: aigid serve vs one predict per request ---------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(kind: str, folder: Path):
    port = _free_port()
    if kind == "serve":
        cmd = [sys.executable, "-m", "aigid.cli", "serve", str(folder), "--port", str(port), "--no-evidence",
               "--max-batch-size", "32", "--max-wait-ms", "5", "--max-queue", "1024"]
    else:
        cmd = [sys.executable, str(HERE / "_naive_server.py"), str(folder), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "AIGID_QUIET": "1"})
    url = f"http://127.0.0.1:{port}"
    body = photo_like_jpeg(999)
    for _ in range(1200):
        try:
            if httpx.post(url + "/v1/score", content=body, headers={"content-type": "image/jpeg"}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} server did not come up")


@pytest.fixture(scope="module")
def servers(vit_b32_folder):
    started = {kind: _start(kind, vit_b32_folder) for kind in ("serve", "naive")}
    yield {kind: url for kind, (_, url) in started.items()}
    for proc, _ in started.values():
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _batch_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    total = float(re.search(r"^aigid_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^aigid_batch_size_count (\S+)", text, re.M).group(1))
    return total, count


def _closed_loop(url: str, clients: int, bodies: list[bytes]) -> list[float]:
    """``REQUESTS`` requests from ``clients`` threads, each sending its next as soon as the last
    answered; latencies in seconds. Every request must be answered 200, once."""
    latencies: list[float] = []
    answered = []

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as c:
            for i in range(k, REQUESTS, clients):
                started = time.perf_counter()
                r = c.post(url + "/v1/score", content=bodies[i % len(bodies)], headers={"content-type": "image/jpeg"})
                latencies.append(time.perf_counter() - started)
                assert r.status_code == 200 and len(r.json()["results"]) == 1
                answered.append(i)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    assert sorted(answered) == list(range(REQUESTS))  # nothing lost, nothing repeated
    return latencies


@pytest.mark.parametrize("clients", [1, 8, 32])
@pytest.mark.parametrize("kind", ["serve", "naive"])
def test_closed_loop_load(benchmark, servers, clients, kind):
    url = servers[kind]
    bodies = [photo_like_jpeg(i) for i in range(32)]
    latencies: list[float] = []
    before = _batch_counters(url) if kind == "serve" else None
    benchmark.group = f"serve-load-{clients}-clients-{REQUESTS}-requests"
    benchmark.pedantic(lambda: latencies.extend(_closed_loop(url, clients, bodies)), rounds=ROUNDS, iterations=1)
    wall = statistics.median(benchmark.stats.stats.data)
    q = statistics.quantiles(latencies, n=100)
    info = {"clients": clients, "img_per_s": round(REQUESTS / wall, 1), "p50_ms": round(q[49] * 1000, 1),
            "p99_ms": round(q[98] * 1000, 1)}
    if before is not None:
        total, count = _batch_counters(url)
        info["mean_batch"] = round((total - before[0]) / max(1.0, count - before[1]), 2)
    benchmark.extra_info.update(info)
    record_comparison(benchmark, case=f"serve-{clients}-clients", name=kind, ours=kind == "serve",
                      means="aigid serve (dynamic batching)" if kind == "serve"
                      else "one predict per request (Starlette thread pool)")
    print(f"\n{kind:>5} {clients:>2} clients: {info}")
