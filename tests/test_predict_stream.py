"""``predict`` in bounded batches and ``predict_iter`` as a stream: the same numbers as one big
batch, errors named by their index in the whole input, and nothing read ahead of the model
beyond the decoder's look-ahead (memory flat in the number of items). Both detectors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.data.chunks import LOOKAHEAD_CHUNKS, prepared_chunks
from aigid.data.images import InputError
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mirage():
    return MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()


@pytest.fixture(scope="module")
def unigendet():
    return UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()


def _images(n, seed=0, sizes=((40, 52),)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def _files(tmp_path, n):
    paths = []
    for i, arr in enumerate(_images(n)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_chunks_give_the_numbers_of_one_batch(mirage, tmp_path, workers):
    paths = _files(tmp_path, 11)
    whole = mirage.predict(paths, batch_size=len(paths), workers=0)
    chunked = mirage.predict(paths, batch_size=4, workers=workers)
    assert chunked.shape == (11,)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_skipped_items_keep_their_index_in_the_whole_input(mirage, tmp_path):
    paths = _files(tmp_path, 9)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    items = paths[:6] + [tmp_path / "bad.png"] + paths[6:]
    scores, errors = mirage.predict(items, batch_size=4, errors="skip", return_errors=True)
    assert list(errors) == [6] and "bad.png" not in errors[6]  # the reason, not the path
    assert math.isnan(scores[6]) and not torch.isnan(scores[[0, 5, 7, 9]]).any()
    torch.testing.assert_close(scores[torch.arange(10) != 6], mirage.predict(paths, batch_size=32), atol=1e-6, rtol=0)
    with pytest.raises(InputError) as err:
        mirage.predict(items, batch_size=4)
    assert err.value.index == 6 and "bad.png" in str(err.value)


def test_predict_iter_streams_in_order_from_any_iterable(mirage):
    images = _images(7)
    expected = mirage.predict(images, batch_size=7).tolist()
    got = list(mirage.predict_iter(iter(images), batch_size=3))
    assert got == pytest.approx(expected, abs=1e-6)
    with_errors = list(mirage.predict_iter(images[:2], batch_size=3, return_errors=True))
    assert [e for _, e in with_errors] == [None, None]


def test_nothing_is_read_far_ahead_of_the_model(mirage):
    """Catches a predict that materialises the whole input (list(...)) before scoring."""
    pulled = 0
    source = _images(3)

    def many():  # a stream longer than anything the decoder may read ahead
        nonlocal pulled
        for i in range(60):
            pulled += 1
            yield source[i % 3]

    stream = mirage.predict_iter(many(), batch_size=4, workers=2)
    first = [next(stream) for _ in range(4)]
    assert len(first) == 4
    assert pulled <= 4 * (LOOKAHEAD_CHUNKS + 1)  # the chunk scored plus the look-ahead
    stream.close()


def test_preprocessed_batches_are_sliced(mirage):
    pixels = mirage.preprocess(_images(5))
    torch.testing.assert_close(mirage.predict(pixels, batch_size=2), mirage.predict(pixels, batch_size=5),
                               atol=1e-6, rtol=0)
    sizes = [len(p.pixels) for p in prepared_chunks(pixels, mirage.transform, 2)]
    assert sizes == [2, 2, 1]


def test_an_empty_list_is_still_an_error(mirage):
    with pytest.raises(ValueError, match="no images"):
        mirage.predict([])
    assert list(mirage.predict_iter(iter([]))) == []


def test_unigendet_chunks_of_different_sizes(unigendet):
    images = _images(5, sizes=((40, 52), (64, 32), (48, 48)))
    whole = unigendet.predict(images, batch_size=5)
    torch.testing.assert_close(unigendet.predict(images, batch_size=2), whole, atol=1e-5, rtol=0)
    assert list(unigendet.predict_iter(images, batch_size=2)) == pytest.approx(whole.tolist(), abs=1e-5)
