"""Test-wide setup: Triton's interpreter on CPU-only machines, the ``gpu`` marker, seeds."""
import os

import pytest
import torch

# Must be set before Triton is first imported so @triton.jit builds interpretable kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AIGID_QUIET", "1")


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
