"""The HTTP contract of ``POST /v1/score``, shared by ``aigid serve`` and the Ray Serve deployment.

Request: a raw image body (``Content-Type: image/*`` or ``application/octet-stream``, or none), or
``multipart/form-data`` with one or more fields named ``file``. Response: ``{"results": [...]}``,
one object per image in order — ``p_fake``, ``label`` (``fake`` iff ``p_fake > threshold``),
``threshold``, ``calibrated``, ``model`` (the detector's fingerprint), ``detector`` (its name) and
``evidence`` (the provenance the scan records) — or ``{"error", "status"}`` for an image that
failed. Status: 413 over the size limit (from ``Content-Length`` before anything is read, else
while reading), 415 not an image, 422 an image that does not decode, 503 (``Retry-After``) when
the queue is full; with several images, 200 unless all failed alike. Images are never logged.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse

from aigid.data.images import ImageError
from aigid.data.sources import SNIFF_BYTES, image_format
from aigid.errors import BatcherClosedError, QueueFullError
from aigid.models.identity import model_id
from aigid.models.precision import precision_of
from aigid.provenance import read_evidence

RETRY_AFTER_S = 1
# curl --data-binary sends application/x-www-form-urlencoded unless told otherwise: take it as raw
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")


class HTTPProblem(Exception):
    """A request refused as a whole: its status, the reason (the JSON body) and extra headers."""

    def __init__(self, status: int, reason: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.reason, "status": self.status}, self.status, headers=self.headers)


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 20 << 20
    max_files: int = 16


@dataclass(frozen=True)
class DetectorInfo:
    """What every result says about the detector that scored it."""
    model: str
    detector: str
    threshold: float
    calibrated: bool
    precision: str = "fp32"  # scores differ slightly between precisions: each result says which

    @classmethod
    def of(cls, detector: Any, name: str, threshold: Optional[float] = None) -> "DetectorInfo":
        """A loaded detector's info (``threshold``: the served one, default the detector's own)."""
        t = detector.threshold if threshold is None else threshold
        return cls(model_id(detector), name, float(t), bool(getattr(detector.config, "calibration", None)),
                   precision_of(detector))


def _too_large(limit: int) -> HTTPProblem:
    return HTTPProblem(413, f"request body over the limit of {limit} bytes (--max-image-bytes)")


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, limits: Limits) -> list[bytes]:
    """The images of one request, or ``HTTPProblem`` (413, 415, 400)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = ctype == "multipart/form-data"
    if ctype and not multipart and not ctype.startswith(RAW_TYPES):
        raise HTTPProblem(415, f"content type {ctype!r} is not an image: send the image bytes "
                               "(image/* or application/octet-stream) or multipart field 'file'")
    limit = limits.max_image_bytes * (limits.max_files if multipart else 1)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)  # refused before a byte of the body is read
    if not multipart:
        body = await _read_capped(request, limit)
        if not body:
            raise HTTPProblem(400, "empty body: send the image bytes")
        return [body]
    return await _read_multipart(request, limits)


async def _read_multipart(request: Request, limits: Limits) -> list[bytes]:
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=limits.max_files, max_part_size=limits.max_image_bytes)
    except MultiPartException as err:
        if "maximum size" in str(err).lower():
            raise _too_large(limits.max_image_bytes) from None
        raise HTTPProblem(400, f"malformed multipart body: {err}") from None
    try:
        files = [f for f in form.getlist("file") if hasattr(f, "read")]
        if not files:
            raise HTTPProblem(400, "multipart body has no field 'file' holding an image")
        blobs = []
        for f in files:
            data = await f.read(limits.max_image_bytes + 1)
            if len(data) > limits.max_image_bytes:
                raise _too_large(limits.max_image_bytes)
            blobs.append(data)
        return blobs
    finally:
        await form.close()


Score = Callable[[bytes], Awaitable[float]]


async def _one(blob: bytes, score: Score, info: DetectorInfo, evidence: bool) -> dict[str, Any]:
    if image_format(blob[:SNIFF_BYTES]) is None:
        return {"error": "not an image: its bytes match no image format aigid reads", "status": 415}
    try:
        p = await score(blob)
    except (QueueFullError, BatcherClosedError) as err:
        return {"error": str(err), "status": 503}
    except ImageError as err:
        return {"error": f"the image does not decode: {getattr(err, 'reason', err)}", "status": 422}
    result = {"p_fake": p, "label": "fake" if p > info.threshold else "real", "threshold": info.threshold,
              "calibrated": info.calibrated, "model": info.model, "detector": info.detector,
              "precision": info.precision}
    if evidence:
        result["evidence"] = await asyncio.to_thread(read_evidence, blob)
    return result


async def score_request(request: Request, score: Score, info: DetectorInfo, limits: Limits,
                        evidence: bool = True) -> JSONResponse:
    """The whole ``POST /v1/score``: read, score every image concurrently, answer."""
    try:
        blobs = await read_images(request, limits)
    except HTTPProblem as problem:
        return problem.response()
    results = await asyncio.gather(*(_one(b, score, info, evidence) for b in blobs))
    statuses = {r.get("status", 200) for r in results}
    status = statuses.pop() if len(statuses) == 1 else 200
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"results": results}, status, headers=headers)
