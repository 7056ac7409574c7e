"""``aigid.Batcher``: many callers, one model worker. Scores equal serial ``predict``; every future
resolves exactly once; a bad image fails only its own future; a model error fails only its
batch; a full queue refuses at once; ``close`` drains. MiraGe and UniGenDet."""
from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import wait

import numpy as np
import pytest
import torch

import aigid
from aigid.data.images import InputError
from aigid.errors import BatcherClosedError, QueueFullError
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mirage():
    return MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()


def _images(n, sizes=((40, 52),), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


class Gate:
    """A detector stand-in around a real one: its forward waits for ``open`` and can be told to fail."""

    def __init__(self, detector):
        self.detector, self.transform = detector, detector.transform
        self.open, self.fail_next, self.batches = threading.Event(), False, []

    def score_prepared(self, prep):
        self.open.wait(timeout=30)
        self.batches.append(prep.count)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory (planted)")
        return self.detector.score_prepared(prep)


def test_eight_threads_times_a_hundred_equal_serial_predict(mirage):
    images = _images(20)
    expected = mirage.predict(images, batch_size=1).tolist()
    sizes, resolved = [], Counter()
    with aigid.Batcher(mirage, max_batch_size=16, max_wait_ms=2, max_queue=1000,
                       on_batch=lambda n, s: sizes.append(n)) as batcher:
        results: dict[tuple[int, int], object] = {}

        def client(t):
            for k in range(100):
                f = batcher.submit(images[(t * 7 + k) % 20])
                f.add_done_callback(lambda _f, key=(t, k): resolved.update([key]))
                results[(t, k)] = f

        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wait(list(results.values()), timeout=120)
    assert len(results) == 800 and set(resolved.values()) == {1}  # every future once, none twice
    for (t, k), f in results.items():
        assert f.result() == pytest.approx(expected[(t * 7 + k) % 20], abs=1e-5)
    assert sum(sizes) == 800 and max(sizes) > 1  # batches were formed


def test_a_bad_image_fails_only_its_own_future(mirage):
    good = _images(3)
    with aigid.Batcher(mirage, max_wait_ms=20) as batcher:
        futures = [batcher.submit(good[0]), batcher.submit(b"not an image"), batcher.submit(good[1]),
                   batcher.submit(np.zeros((2, 2, 2, 2), np.uint8))]
        with pytest.raises(InputError, match="not a recognised image"):
            futures[1].result(timeout=30)
        with pytest.raises(InputError):
            futures[3].result(timeout=30)
        got = [futures[0].result(timeout=30), futures[2].result(timeout=30)]
    assert got == pytest.approx(mirage.predict(good[:2]).tolist(), abs=1e-5)


def test_a_model_error_fails_its_batch_and_the_batcher_goes_on(mirage):
    gate = Gate(mirage)
    gate.open.set()
    gate.fail_next = True
    with aigid.Batcher(gate, max_batch_size=4, max_wait_ms=50) as batcher:
        first = [batcher.submit(im) for im in _images(2)]
        for f in first:
            with pytest.raises(RuntimeError, match="planted"):
                f.result(timeout=30)
        after = batcher.submit(_images(1)[0]).result(timeout=30)
    assert after == pytest.approx(float(mirage.predict(_images(1))[0]), abs=1e-5)


def test_a_full_queue_refuses_at_once_and_recovers(mirage):
    gate = Gate(mirage)
    images = _images(4)
    with aigid.Batcher(gate, max_batch_size=1, max_wait_ms=0, max_queue=3) as batcher:
        running = batcher.submit(images[0])  # taken by the worker, which waits at the gate
        while batcher.queue_depth:
            pass
        waiting = [batcher.submit(im) for im in images[1:4]]
        with pytest.raises(QueueFullError, match="max_queue=3"):
            batcher.submit(images[0])
        assert batcher.queue_depth == 3
        gate.open.set()
        assert [f.result(timeout=30) for f in [running, *waiting]] == \
            pytest.approx(mirage.predict(images).tolist(), abs=1e-5)
        assert batcher.submit(images[0]).result(timeout=30) is not None  # room again


def test_close_drains_then_refuses(mirage):
    batcher = aigid.Batcher(mirage, max_batch_size=4, max_wait_ms=50)
    futures = [batcher.submit(im) for im in _images(10)]
    batcher.close()
    assert all(f.done() and not f.cancelled() for f in futures)
    assert [f.result() for f in futures] == pytest.approx(mirage.predict(_images(10)).tolist(), abs=1e-5)
    with pytest.raises(BatcherClosedError):
        batcher.submit(_images(1)[0])


def test_close_without_drain_cancels_what_waits(mirage):
    gate = Gate(mirage)
    batcher = aigid.Batcher(gate, max_batch_size=1, max_wait_ms=0)
    futures = [batcher.submit(im) for im in _images(5)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    gate.open.set()
    closer.join(timeout=30)
    assert all(f.done() for f in futures) and any(f.cancelled() for f in futures)


def test_asyncio_callers(mirage):
    images = _images(6)

    async def main():
        with aigid.Batcher(mirage, max_batch_size=8, max_wait_ms=10) as batcher:
            return await asyncio.gather(*(batcher.score(im) for im in images))

    assert asyncio.run(main()) == pytest.approx(mirage.predict(images).tolist(), abs=1e-5)


def test_unigendet_packs_images_of_different_sizes():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    images = _images(5, sizes=((40, 52), (64, 32), (48, 48)))
    sizes = []
    with aigid.Batcher(model, max_batch_size=8, max_wait_ms=200, on_batch=lambda n, s: sizes.append(n)) as b:
        futures = [b.submit(im) for im in images]
        got = [f.result(timeout=60) for f in futures]
    assert got == pytest.approx(model.predict(images, batch_size=1).tolist(), abs=1e-5)
    assert max(sizes) > 1 and torch.isfinite(torch.tensor(got)).all()
