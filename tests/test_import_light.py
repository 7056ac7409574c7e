"""``import aigid`` stays light: the heavy libraries load when a detector or transform is used."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torchvision", "open_clip", "triton", "diffusers", "torch._dynamo", "sklearn")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}; import sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_aigid_loads_none_of_the_heavy_libraries():
    assert _loaded_after("import aigid") == []


def test_the_public_names_still_resolve_and_load_what_they_need():
    loaded = _loaded_after("import aigid; aigid.MiraGe; aigid.train; aigid.evaluate; aigid.scan; "
                           "aigid.load_detector; aigid.TrainConfig")
    assert "open_clip" in loaded  # asking for the detector class loads its backbone library
    assert callable(__import__("aigid").train) and callable(__import__("aigid").evaluate)
