"""Scale-out on Ray Serve (``pip install 'aigid[dist]' 'ray[serve]'``): replicas of one detector
behind Ray's HTTP proxy, with the same contract as ``aigid serve`` (``POST /v1/score``,
``/healthz``, ``/readyz``; Ray Serve exports its own Prometheus metrics, so ``/metrics`` is not
repeated here). Batching is Ray's ``@serve.batch`` over the same batch function as the
in-process :class:`~aigid.serving.batcher.Batcher` (:mod:`aigid.serving.scoring`).

    from ray import serve
    from aigid.serving.ray_serve import detector_app
    serve.run(detector_app("runs/mirage", num_replicas=4, num_gpus=1), route_prefix="/")
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from aigid.data.images import ImageError, InputError
from aigid.serving.protocol import DetectorInfo, Limits, score_request
from aigid.serving.scoring import decode, score_batch


def _score_images(detector: Any, images: list[bytes]) -> list[Any]:
    """P(fake) per image, or the ``InputError`` of one that does not decode (not raised: one bad
    image must not fail the batch)."""
    out: list[Any] = [None] * len(images)
    pixels, where = [], []
    for i, blob in enumerate(images):
        try:
            pixels.append(decode(detector, blob))
            where.append(i)
        except ImageError as err:
            out[i] = err if isinstance(err, InputError) else InputError(str(err))
    for i, p in zip(where, score_batch(detector, pixels) if pixels else []):
        out[i] = p
    return out


def detector_app(detector: str, *, checkpoint: Optional[str] = None, device: Optional[str] = None,
                 num_replicas: int = 1, num_gpus: float = 0, num_cpus: float = 1,
                 max_batch_size: int = 32, max_wait_ms: float = 5.0, max_image_bytes: int = 20 << 20,
                 max_files: int = 16, threshold: Optional[float] = None, evidence: bool = True) -> Any:
    """A bound Ray Serve application: ``num_replicas`` replicas, each with ``num_gpus`` GPUs and
    ``num_cpus`` CPUs, loading ``detector`` (a folder or shipped name) in its own process."""
    from ray import serve
    from starlette.responses import JSONResponse

    limits = Limits(max_image_bytes, max_files)

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    class AigidDetector:
        def __init__(self) -> None:
            from aigid.models.registry import load_detector

            self.detector = load_detector(detector, checkpoint=checkpoint, device=device)
            self.info = DetectorInfo.of(self.detector, detector, threshold)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000)
        async def _batch(self, images: list[bytes]) -> list[Any]:
            return await asyncio.to_thread(_score_images, self.detector, images)  # off the replica's loop

        async def score(self, image: bytes) -> float:
            result = await self._batch(image)
            if isinstance(result, Exception):
                raise result
            return result

        async def __call__(self, request: Any) -> Any:
            path = request.url.path.rstrip("/")
            if path == "/v1/score" and request.method == "POST":
                return await score_request(request, self.score, self.info, limits, evidence)
            if path == "/healthz":
                return JSONResponse({"status": "alive"})
            if path == "/readyz":  # a replica answers only once its constructor has loaded the model
                return JSONResponse({"status": "ready", "model": self.info.model})
            return JSONResponse({"error": f"no route {request.method} {path}", "status": 404}, 404)

    return AigidDetector.bind()
