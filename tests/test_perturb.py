"""Robustness perturbations: they change pixels the way their names say, and are picklable."""
import pickle

import numpy as np
import pytest
from PIL import Image

from aigid.data.perturb import SIDBENCH_SWEEP, Perturbation, parse_sweep


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3)).astype(np.uint8))


def test_sweep_names_expand_and_validate():
    assert [p.name for p in parse_sweep("sidbench")] == list(SIDBENCH_SWEEP)
    assert [p.name for p in parse_sweep("jpeg90, blur2")] == ["jpeg90", "blur2"]
    assert parse_sweep("") == [] and parse_sweep(()) == []
    for bad in ("jpeg0", "jpeg101", "blur", "noise3"):
        with pytest.raises(ValueError):
            Perturbation(bad)


def test_jpeg_loses_more_at_lower_quality_and_keeps_size():
    img = _image()
    ref = np.asarray(img, dtype=np.float64)
    err = {q: np.abs(np.asarray(Perturbation(f"jpeg{q}")(img), dtype=np.float64) - ref).mean()
           for q in (95, 30)}
    assert Perturbation("jpeg30")(img).size == img.size
    assert 0 < err[95] < err[30]


def test_blur_smooths_noise_more_with_larger_sigma():
    img = _image(1)
    std = {s: np.asarray(Perturbation(f"blur{s}")(img), dtype=np.float64).std() for s in (2, 4)}
    assert std[4] < std[2] < np.asarray(img, dtype=np.float64).std()
    assert np.array_equal(np.asarray(Perturbation("clean")(img)), np.asarray(img))


def test_perturbations_pickle_for_dataloader_workers():
    p = pickle.loads(pickle.dumps(Perturbation("jpeg50")))
    assert np.array_equal(np.asarray(p(_image())), np.asarray(Perturbation("jpeg50")(_image())))
