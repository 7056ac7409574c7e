"""The public names keep working whatever is imported first: ``aigid.scan``/``aigid.train``/
``aigid.evaluate`` are the functions, and the packages that hold them (``aigid.scanning``,
``aigid.training``, ``aigid.evaluation``) import on their own, before or after ``aigid``.

The packages are not named ``scan``/``train``: a package and a function cannot share the name
``aigid.scan`` (``import aigid.scan.store as s`` would walk the function's attributes)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from PIL import Image

SCAN_AND_CHECK = """
import aigid
results = list(aigid.scan([{folder!r}], aigid.load_detector({detector!r}), progress=False, num_workers=0))
assert [r.error is None for r in results] == [True, True], results
assert aigid.scan.__module__ == "aigid.scanning.local" and callable(aigid.train) and callable(aigid.evaluate)
assert aigid.train.__module__ == "aigid.training.mirage"
assert aigid.evaluate.__module__ == "aigid.evaluation.runner"
import aigid.scanning.store as store
assert store.ResultStore.__module__ == "aigid.scanning.store"
print("ok")
"""


def _run(code: str, cwd) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("first", [
    "",                                                   # aigid first
    "import aigid.scanning.store\n",                      # a submodule of the scan package first
    "import aigid.training.state, aigid.evaluation.calibration\n",
    "import aigid.cli\n",
])
def test_functions_and_packages_in_either_import_order(first, tiny_mirage_folder, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (20 + i, 16), (i * 90, 40, 200)).save(folder / f"{i}.png")
    code = first + SCAN_AND_CHECK.format(folder=str(folder), detector=str(tiny_mirage_folder))
    assert _run(code, tmp_path).strip().endswith("ok")


def test_the_public_names_are_the_same_objects_as_their_homes():
    import aigid
    from aigid.evaluation.runner import evaluate
    from aigid.models.registry import load_detector
    from aigid.scanning.local import scan
    from aigid.training.config import TrainConfig
    from aigid.training.mirage import train
    from aigid.version import __version__

    assert (aigid.scan, aigid.train, aigid.evaluate, aigid.load_detector, aigid.TrainConfig) == \
        (scan, train, evaluate, load_detector, TrainConfig)
    assert aigid.__version__ == __version__
    assert sorted(aigid.__all__) == sorted(["load_detector", "train", "evaluate", "scan", "Batcher", "MiraGe",
                                            "MiraGeConfig", "TrainConfig", "__version__"])
