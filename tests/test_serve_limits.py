"""The server under pressure, over real HTTP on loopback (uvicorn in a thread of this process, so
the test can hold the model): ``/readyz`` and ``/v1/score`` answer 503 while the detector loads;
a full queue answers 503 with ``Retry-After`` at once, and the server recovers."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from aigid.models.mirage import MiraGe, MiraGeConfig  # noqa: E402
from aigid.serving.http import ServeOptions, build_app  # noqa: E402


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class HeldDetector:
    """A real tiny MiraGe whose forwards wait for ``go`` (after the warm-up)."""

    def __init__(self):
        self.inner = MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()
        self.transform, self.config, self.threshold = self.inner.transform, self.inner.config, 0.5
        self.go, self.calls = threading.Event(), 0

    def state_dict(self):
        return self.inner.state_dict()

    def score_prepared(self, prep):
        self.calls += 1
        if self.calls > 1:  # the first call is the server's warm-up
            self.go.wait(timeout=60)
        return self.inner.score_prepared(prep)


class Server:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout=180):
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def test_503_while_loading_then_ready():
    loaded = threading.Event()
    detector = HeldDetector()
    detector.go.set()

    def load():
        loaded.wait(timeout=60)
        return detector

    server = Server(build_app(load, ServeOptions()))
    try:
        r = httpx.get(server.url + "/readyz")
        assert r.status_code == 503 and r.json()["error"] == "model loading" and r.headers["retry-after"]
        r = httpx.post(server.url + "/v1/score", content=_jpeg(0), headers={"content-type": "image/jpeg"})
        assert r.status_code == 503
        assert httpx.get(server.url + "/healthz").status_code == 200  # alive while loading
        loaded.set()
        server.wait_ready()
        r = httpx.post(server.url + "/v1/score", content=_jpeg(0), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
    finally:
        server.stop()


def test_a_failed_load_says_why():
    def load():
        raise FileNotFoundError("no weights in /nowhere")

    server = Server(build_app(load, ServeOptions()))
    try:
        for _ in range(100):
            r = httpx.get(server.url + "/readyz")
            if "failed" in r.json()["error"]:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "no weights in /nowhere" in r.json()["error"]
    finally:
        server.stop()


def test_a_full_queue_answers_503_with_retry_after_at_once():
    detector = HeldDetector()
    server = Server(build_app(lambda: detector, ServeOptions(max_batch_size=1, max_wait_ms=0, max_queue=2,
                                                                evidence=False)))
    try:
        server.wait_ready()
        post = lambda i: httpx.post(server.url + "/v1/score", content=_jpeg(i),  # noqa: E731
                                    headers={"content-type": "image/jpeg"}, timeout=60)
        deadline = time.monotonic() + 120

        def until(condition):
            while not condition():
                assert time.monotonic() < deadline
                time.sleep(0.02)

        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(post, 0)]
            until(lambda: detector.calls == 2)  # the first image is in the model, which waits
            held += [pool.submit(post, i) for i in (1, 2)]  # two queued behind it
            until(lambda: "aigid_queue_depth 2.0" in httpx.get(server.url + "/metrics").text)
            started = time.monotonic()
            refused = post(9)
            assert time.monotonic() - started < 5  # refused at once, not queued behind the model
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "max_queue=2" in refused.json()["results"][0]["error"]
            detector.go.set()
            assert [f.result().status_code for f in held] == [200, 200, 200]
        assert post(10).status_code == 200
        assert 'aigid_requests_total{status="503"} 1.0' in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
