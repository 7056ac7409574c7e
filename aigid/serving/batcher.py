"""``Batcher``: many callers, one model worker, dynamic batches — the embedded default for serving.

Callers on any number of threads (``submit`` → ``concurrent.futures.Future``) or an asyncio loop
(``await score(image)``) hand in one image each. Images are decoded on a small thread pool as they
arrive, so a bad one fails only its own future and never reaches the model. One worker thread
takes the decoded images in arrival order and runs a forward as soon as it holds
``max_batch_size`` of them, or ``max_wait_ms`` after the first one of the batch arrived — the
trade: a longer wait gives fuller batches (throughput) at up to that much added latency when
traffic is light. ``max_queue`` bounds the images accepted but not yet in a batch: past it,
``submit`` raises :class:`~aigid.errors.QueueFullError` at once (backpressure) instead of growing.
A model error fails that batch's futures and the worker goes on with the next batch.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch

from aigid.data.chunks import default_decode_workers
from aigid.data.images import ImageError, InputError, describe
from aigid.errors import BatcherClosedError, QueueFullError
from aigid.serving.scoring import decode, score_batch

log = logging.getLogger(__name__)

_STOP = object()
BatchHook = Callable[[int, float], None]


class Batcher:
    """Dynamic batching in front of one detector (MiraGe or UniGenDet, head verdict).

    ``max_batch_size``: images per forward at most. ``max_wait_ms``: how long the first image of
    a batch waits for company. ``max_queue``: images accepted and not yet batched, at most.
    ``decode_workers``: decode threads (default 2). ``on_batch(size, seconds)``: called after
    every forward (metrics). Use as a context manager, or call :meth:`close`."""

    def __init__(self, detector: Any, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, decode_workers: Optional[int] = None,
                 on_batch: Optional[BatchHook] = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0; got "
                             f"{max_batch_size}, {max_queue}, {max_wait_ms}")
        self.detector = detector
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self._on_batch = on_batch
        self._ready: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0          # accepted, not yet in a batch (decoding or waiting)
        self._closed = False
        self._abandon = False     # close(drain=False): cancel instead of scoring
        self._decoders = ThreadPoolExecutor(decode_workers or default_decode_workers(),
                                            thread_name_prefix="aigid-batcher-decode")
        self._worker = threading.Thread(target=self._run, name="aigid-batcher-model", daemon=True)
        self._worker.start()

    # ---- callers ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Images accepted and not yet in a batch."""
        return self._queued

    def submit(self, image: Any) -> Future:
        """Queue one image (anything ``predict`` takes); a future of its P(fake) (a float), or of
        the image's ``InputError``. Raises ``QueueFullError`` when ``max_queue`` images wait, and
        ``BatcherClosedError`` after :meth:`close`."""
        with self._lock:
            if self._closed:
                raise BatcherClosedError("this Batcher is closed")
            if self._queued >= self.max_queue:
                raise QueueFullError(f"{self._queued} images are waiting (max_queue={self.max_queue}); "
                                     "try again shortly")
            self._queued += 1
            future: Future = Future()
            self._decoders.submit(self._decode, image, future)
        return future

    async def score(self, image: Any) -> float:
        """``submit`` for an asyncio caller: P(fake) of ``image`` (raises its error)."""
        return await asyncio.wrap_future(self.submit(image))

    def close(self, drain: bool = True) -> None:
        """Take no new images; with ``drain`` (default) score everything accepted first, else
        cancel what has not reached the model. Returns when the worker has stopped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._abandon = not drain
        self._decoders.shutdown(wait=True)  # every accepted image is now in the queue or failed
        self._ready.put(_STOP)
        self._worker.join()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- decode threads ---------------------------------------------------------------------
    def _release(self, n: int = 1) -> None:
        with self._lock:
            self._queued -= n

    def _decode(self, image: Any, future: Future) -> None:
        if self._abandon:
            future.cancel()
        if future.cancelled():
            self._release()
            return
        try:
            pixels = decode(self.detector, image)
        except ImageError as err:
            self._release()
            reason = err.reason if isinstance(err, InputError) else str(err)
            future.set_exception(InputError(reason, None, describe(image)))
            return
        except BaseException as err:  # a decoder bug fails this image, not the batcher
            self._release()
            future.set_exception(err)
            return
        self._ready.put((pixels, future))

    # ---- the model worker -------------------------------------------------------------------
    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                entry = self._ready.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is _STOP:
                stop = True
                break
            batch.append(entry)
        self._release(len(batch))
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._ready.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            if self._abandon:
                for _, f in batch:
                    f.cancel()
            live = [(px, f) for px, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    scores = score_batch(self.detector, [px for px, _ in live])
            except Exception as err:  # the model failed this batch: its callers hear why
                log.warning("aigid: a batch of %d failed: %s: %s", len(live), type(err).__name__, err)
                for _, f in live:
                    f.set_exception(err)
                continue
            for (_, f), s in zip(live, scores):
                f.set_result(float(s))
            if self._on_batch is not None:
                self._on_batch(len(live), time.perf_counter() - started)
