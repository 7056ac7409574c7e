"""Errors that callers (the CLI, pipelines) catch by type, importable without loading a model."""
from __future__ import annotations

__all__ = ["MissingHeadError", "StoreError", "StoreLockedError", "QueueFullError", "BatcherClosedError"]


class MissingHeadError(RuntimeError):
    """The loaded weights have no detection head (e.g. a BAGEL base without UniGenDet's
    fine-tuned checkpoint), so the detector cannot score."""


class StoreError(RuntimeError):
    """A results file aigid will not use: not SQLite, another program's, or a newer schema."""


class StoreLockedError(StoreError):
    """Another process holds the results file for writing (a scan is running into it)."""


class QueueFullError(RuntimeError):
    """A ``Batcher`` holds ``max_queue`` images already: refused at once (backpressure), nothing
    queued; try again later (HTTP: 503 with ``Retry-After``)."""


class BatcherClosedError(RuntimeError):
    """The ``Batcher`` was closed: it takes no new images (those submitted before still finish)."""
