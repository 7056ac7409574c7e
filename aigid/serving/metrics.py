"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so two servers
in one process (tests, an app embedding aigid) never mix their counts."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Requests by status, queue depth, batch sizes, request latency."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("aigid_requests", "HTTP requests to /v1/score by status", ["status"],
                                registry=self.registry)
        self.queue = Gauge("aigid_queue_depth", "images accepted and not yet in a batch", registry=self.registry)
        self.queue.set_function(queue_depth)
        self.batch_size = Histogram("aigid_batch_size", "images per model forward", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_seconds = Histogram("aigid_batch_seconds", "seconds per model forward",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("aigid_request_latency_seconds", "seconds from request to response",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
