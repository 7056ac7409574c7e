"""The Ray Serve deployment on a local Ray: the same HTTP contract as ``aigid serve``, results
equal to ``predict``, bad images failing alone, batches formed by ``@serve.batch``."""
from __future__ import annotations

import io
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
import ray  # noqa: E402

from aigid.serving.ray_serve import _score_images, detector_app  # noqa: E402

pytestmark = pytest.mark.slow


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_mirage_folder):
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(detector_app(str(tiny_mirage_folder), max_batch_size=8, max_wait_ms=50, evidence=False),
              route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_same_contract_and_scores_as_predict(ray_url, tiny_mirage_folder):
    from aigid.models.registry import load_detector

    detector = load_detector(str(tiny_mirage_folder))
    bodies = [_jpeg(i) for i in range(6)]
    assert httpx.get(ray_url + "/healthz", timeout=60).json() == {"status": "alive"}
    with ThreadPoolExecutor(6) as pool:  # concurrent requests: one @serve.batch call
        responses = list(pool.map(lambda b: httpx.post(ray_url + "/v1/score", content=b, timeout=120,
                                                       headers={"content-type": "image/jpeg"}), bodies))
    assert [r.status_code for r in responses] == [200] * 6
    got = [r.json()["results"][0]["p_fake"] for r in responses]
    assert got == pytest.approx(detector.predict(bodies).tolist(), abs=1e-5)
    assert {r.json()["results"][0]["precision"] for r in responses} == {"fp32"}  # as aigid serve says it
    files = [("file", ("a.jpg", bodies[0], "image/jpeg")), ("file", ("b.jpg", bodies[1][:150], "image/jpeg"))]
    r = httpx.post(ray_url + "/v1/score", files=files, timeout=120)
    good, bad = r.json()["results"]
    assert r.status_code == 200 and good["p_fake"] == pytest.approx(got[0], abs=1e-5) and bad["status"] == 422
    assert httpx.post(ray_url + "/v1/score", content=b"text", timeout=60).status_code == 415


def test_one_bad_image_does_not_fail_its_batch(tiny_mirage_folder):
    from aigid.models.registry import load_detector

    detector = load_detector(str(tiny_mirage_folder))
    out = _score_images(detector, [_jpeg(0), b"\xff\xd8\xff broken", _jpeg(1)])
    assert isinstance(out[1], Exception) and out[0] == pytest.approx(float(detector.predict([_jpeg(0)])[0]), abs=1e-5)
