"""Errors that callers (the CLI, pipelines) catch by type, importable without loading a model."""
from __future__ import annotations

__all__ = ["MissingHeadError"]


class MissingHeadError(RuntimeError):
    """The loaded weights have no detection head (e.g. a BAGEL base without UniGenDet's
    fine-tuned checkpoint), so the detector cannot score."""
