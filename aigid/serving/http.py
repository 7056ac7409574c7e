"""The HTTP server behind ``aigid serve`` (``pip install 'aigid[serve]'``): Starlette on uvicorn.

``POST /v1/score`` (see :mod:`aigid.serving.protocol`) goes through one :class:`Batcher`, so
concurrent requests share forwards. ``GET /healthz``: the process answers. ``GET /readyz``: the
detector is loaded and has scored a warm-up image (503 before, with the reason if loading
failed). ``GET /metrics``: Prometheus text. The detector loads in the background after the
socket opens, so an orchestrator sees the process alive while a large model loads.

SIGTERM/SIGINT: uvicorn stops accepting, waits for the requests in flight, then the Batcher
drains, and the process exits 0. Binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aigid.serving.batcher import Batcher
from aigid.serving.metrics import ServerMetrics
from aigid.serving.protocol import RETRY_AFTER_S, DetectorInfo, Limits, score_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_image_bytes: int = 20 << 20
    max_files: int = 16
    threshold: Optional[float] = None   # default: the detector's stored threshold
    decode_workers: Optional[int] = None
    evidence: bool = True               # provenance evidence beside each score
    graceful_timeout_s: float = 30.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warmup_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 96, 64)).save(buf, "PNG")
    return buf.getvalue()


class _State:
    def __init__(self) -> None:
        self.batcher: Optional[Batcher] = None
        self.info: Optional[DetectorInfo] = None
        self.ready = False
        self.error: Optional[str] = None


def build_app(load: Callable[[], Any], options: ServeOptions = ServeOptions(), name: str = "detector") -> Starlette:
    """The ASGI app; ``load()`` returns the detector (called once, off the event loop)."""
    state = _State()
    metrics = ServerMetrics(lambda: state.batcher.queue_depth if state.batcher else 0)
    limits = Limits(options.max_image_bytes, options.max_files)

    def load_and_warm() -> None:
        try:
            detector = load()
            state.batcher = Batcher(detector, max_batch_size=options.max_batch_size,
                                    max_wait_ms=options.max_wait_ms, max_queue=options.max_queue,
                                    decode_workers=options.decode_workers, on_batch=metrics.on_batch)
            state.batcher.submit(_warmup_image()).result()
            state.info = DetectorInfo.of(detector, name, options.threshold)
            state.ready = True
            log.info("serve: %s (%s) ready", name, state.info.model)
        except Exception as err:  # readyz says why; the process stays up to be inspected
            state.error = f"{type(err).__name__}: {err}"
            log.error("serve: loading %s failed: %s", name, state.error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loading = asyncio.get_running_loop().run_in_executor(None, load_and_warm)
        yield
        await loading
        if state.batcher is not None:  # uvicorn has waited for the requests in flight
            await asyncio.to_thread(state.batcher.close)
            log.info("serve: drained")

    def not_ready() -> JSONResponse:
        reason = f"model failed to load: {state.error}" if state.error else "model loading"
        return JSONResponse({"error": reason, "status": 503}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def score(request: Request) -> Response:
        started = time.perf_counter()
        if not state.ready:
            response: Response = not_ready()
        else:
            response = await score_request(request, state.batcher.score, state.info, limits, options.evidence)
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(_: Request) -> Response:
        return JSONResponse({"status": "ready", "model": state.info.model}) if state.ready else not_ready()

    async def metrics_page(_: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    routes = [Route("/v1/score", score, methods=["POST"]), Route("/healthz", healthz),
              Route("/readyz", readyz), Route("/metrics", metrics_page)]
    return Starlette(routes=routes, lifespan=lifespan)


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal that stopped it once it has shut down (so the process dies of
    SIGTERM); a drained, finished server should exit 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()


def serve(load: Callable[[], Any], options: ServeOptions = ServeOptions(), name: str = "detector") -> None:
    """Run the server until SIGTERM/SIGINT; returns after draining."""
    if not is_loopback(options.host):
        log.warning("serve: listening on %s, beyond this machine: put it behind a proxy that "
                    "authenticates callers", options.host)
    config = uvicorn.Config(build_app(load, options, name), host=options.host, port=options.port,
                            log_level="info", timeout_graceful_shutdown=options.graceful_timeout_s)
    _Server(config).run()
