"""Test-wide setup: Triton's interpreter on CPU-only machines, the ``gpu`` marker, seeds."""
import copy
import os

import pytest
import torch

# Must be set before Triton is first imported so @triton.jit builds interpretable kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AIGID_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_config():
    """A fresh copy of the shipped tiny MiraGe config (random 4-layer CLIP, 32 px)."""
    from aigid.models.mirage import MiraGeConfig

    return copy.deepcopy(MiraGeConfig.named("tiny"))


@pytest.fixture(scope="module")
def tiny_mirage_folder(tmp_path_factory):
    """A saved tiny MiraGe (seed 0, random backbone saved beside it), one per test module."""
    from aigid.models.mirage import MiraGe, MiraGeConfig

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("det")
    MiraGe(MiraGeConfig.named("tiny"), seed=0).save_pretrained(out)
    return out
