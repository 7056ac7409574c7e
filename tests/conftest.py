"""Test-wide setup: Triton's interpreter on CPU-only machines, the ``gpu`` marker, seeds."""
import copy
import json
import os
from importlib import resources

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


@pytest.fixture
def tiny_config():
    """A fresh copy of the shipped tiny MiraGe config (random 4-layer CLIP, 32 px)."""
    from aigid.models.mirage import MiraGeConfig

    return copy.deepcopy(MiraGeConfig.named("tiny"))
