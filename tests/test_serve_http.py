"""``aigid serve`` over real HTTP on loopback: a uvicorn server in a subprocess (the CLI), httpx and
raw sockets as clients. Results equal ``predict`` on the same files; every status of the
contract (200, 413 from Content-Length and while reading, 415, 422, 503 + Retry-After); metrics;
SIGTERM drains what is in flight and exits 0."""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

MAX_IMAGE_BYTES = 60_000


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_server(detector, *extra, env=None):
    cmd = [sys.executable, "-m", "aigid.cli", "serve", str(detector), "--port", "0",
           "--max-image-bytes", str(MAX_IMAGE_BYTES), *map(str, extra)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines, url = [], None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        url = m.group(1) if m else None
    assert url, "".join(lines)
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # keep the pipe drained
    reader.start()
    proc.reader = reader
    for _ in range(600):
        if httpx.get(url + "/readyz").status_code == 200:
            break
        time.sleep(0.1)
    return proc, url, lines


@pytest.fixture(scope="module")
def server(tiny_mirage_folder):
    proc, url, lines = start_server(tiny_mirage_folder)
    yield url, tiny_mirage_folder, lines
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def detector(tiny_mirage_folder):
    from aigid.models.registry import load_detector
    return load_detector(str(tiny_mirage_folder))


def test_health_ready_and_loopback_only(server):
    url, _, lines = server
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200 and ready.json()["model"].startswith("mirage-")


def test_raw_body_equals_predict(server, detector):
    url, folder, _ = server
    body = _jpeg(1)
    r = httpx.post(url + "/v1/score", content=body, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    (res,) = r.json()["results"]
    assert res["p_fake"] == pytest.approx(float(detector.predict([body])[0]), abs=1e-5)
    assert res["label"] == ("fake" if res["p_fake"] > 0.5 else "real") and res["threshold"] == 0.5
    assert res["calibrated"] is False and res["detector"] == str(folder) and res["precision"] == "fp32"
    from aigid.scanning.fingerprint import model_id
    assert res["model"] == model_id(detector) and res["evidence"]["provenance"] == "none"


def test_multipart_files_each_get_a_result(server, detector):
    url, _, _ = server
    bodies = [_jpeg(i, (40 + 8 * i, 40)) for i in range(3)]
    files = [("file", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(bodies)]
    r = httpx.post(url + "/v1/score", files=files)
    assert r.status_code == 200
    got = [x["p_fake"] for x in r.json()["results"]]
    assert got == pytest.approx(detector.predict(bodies).tolist(), abs=1e-5)


def test_one_bad_file_among_good_ones(server):
    url, _, _ = server
    files = [("file", ("a.jpg", _jpeg(3), "image/jpeg")), ("file", ("b.txt", b"hello", "text/plain"))]
    r = httpx.post(url + "/v1/score", files=files)
    assert r.status_code == 200
    good, bad = r.json()["results"]
    assert "p_fake" in good and bad["status"] == 415


def test_over_the_limit_is_refused_from_content_length_before_the_body(server):
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")  # and never a byte of the body
        reply = b""
        while not reply.rstrip().endswith(b"}"):  # headers and the JSON body may come apart
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"--max-image-bytes" in reply


def test_over_the_limit_while_reading_a_chunked_body(server):
    url, _, _ = server

    def chunks():
        for _ in range(10):
            yield b"\xff\xd8\xff" + b"\0" * 10_000

    r = httpx.post(url + "/v1/score", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_not_an_image_and_undecodable(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/score", content=b"just some text", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "not an image" in r.json()["results"][0]["error"]
    r = httpx.post(url + "/v1/score", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    truncated = _jpeg(4)[:200]
    r = httpx.post(url + "/v1/score", content=truncated, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and "does not decode" in r.json()["results"][0]["error"]
    r = httpx.post(url + "/v1/score", files={"other": ("a.jpg", _jpeg(5), "image/jpeg")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]


def test_metrics_count_requests_and_batches(server):
    url, _, _ = server
    httpx.post(url + "/v1/score", content=_jpeg(6), headers={"content-type": "image/jpeg"})
    text = httpx.get(url + "/metrics").text
    assert re.search(r'aigid_requests_total\{status="200"\} [1-9]', text)
    assert re.search(r"aigid_batch_size_count [1-9]", text) and "aigid_queue_depth" in text
    assert "aigid_request_latency_seconds_bucket" in text


def test_no_request_is_logged_with_its_image(server):
    url, _, lines = server
    marker = b"\xff\xd8\xffSECRET-PIXELS"
    httpx.post(url + "/v1/score", content=marker, headers={"content-type": "image/jpeg"})
    time.sleep(0.2)
    assert not any("SECRET-PIXELS" in line for line in lines)


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_mirage_folder):
    # a long batching window keeps every request in flight when the signal lands
    proc, url, lines = start_server(tiny_mirage_folder, "--max-wait-ms", "1500", "--max-batch-size", "64")
    bodies = [_jpeg(10 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, url + "/v1/score", content=b,
                               headers={"content-type": "image/jpeg"}, timeout=60) for b in bodies]
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 8
    assert all("p_fake" in r.json()["results"][0] for r in responses)
    assert proc.wait(timeout=60) == 0, "".join(lines)
    proc.reader.join(timeout=30)
    assert any("Application shutdown complete" in line for line in lines)


def test_cli_mistakes_get_one_line(tmp_path, capsys):
    from aigid.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aigid serve:") and "nope" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), "--port", "70000"])
    assert exit_.value.code == 2 and "port" in capsys.readouterr().err
