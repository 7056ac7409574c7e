"""README's "Python API" block, run as written, so it cannot drift from the code.

Only what this machine cannot have is swapped, each swap asserted to still match the README's
text: the ViT-L/14 and BAGEL-7B weights become the shipped tiny configs, training and generation
run a few steps, and the names the block leaves to the reader (``items``, the ops' tensors) are
defined in a prelude. A renamed import, function or argument in the README fails here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"

SWAPS = {
    '"model": "vit-l-14"': '"model": "tiny", "max_steps": 2, "batch_size": 4, "progress": False',
    'UniGenDet.from_pretrained("BAGEL-7B-MoT/", checkpoint="UniGenDet/ema.safetensors",':
        'UniGenDet.from_pretrained("unigendet-tiny/", checkpoint=None,',
    'dtype=torch.bfloat16)': 'dtype=torch.float32)',
    'model.explain("a.jpg", greedy=True)': 'model.explain("a.jpg", greedy=True, max_new_tokens=4)',
    'steps=50, cfg=4.0)': 'steps=2, cfg=4.0)',
}

PRELUDE = """
items = ["a.jpg", "corrupt.jpg"]
g = torch.Generator().manual_seed(0)
feats = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1).requires_grad_()
labels = torch.tensor([0, 1, 0, 1, 1, 0])
bank_feats = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1)
bank_labels = torch.tensor([1, 0, 1, 0, 1])
anchors = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
anchor_labels = torch.tensor([0, 1])
q = torch.randn(1, 2, 5, 8, generator=g)  # (B, H, L, d): detection tokens' queries
k_gen, v_gen, k_det, v_det, k_txt, v_txt = (torch.randn(1, 2, n, 8, generator=g) for n in (3, 3, 5, 5, 4, 4))
"""


def readme_block(heading: str = "## Python API") -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def swapped(block: str) -> str:
    for old, new in SWAPS.items():
        assert old in block, f"README's Python API block no longer says {old!r}: update the test's swap"
        block = block.replace(old, new)
    return block


def _labelled_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("real", "fake"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                if label == "fake":
                    img[::4] = 255
                Image.fromarray(img).save(root / split / label / f"{i}.png")


@pytest.fixture
def readme_workdir(tmp_path, monkeypatch):
    from aigid.models.unigendet import UniGenDet, UniGenDetConfig

    _labelled_folder(tmp_path / "data")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    UniGenDet(UniGenDetConfig.named("tiny"), seed=0).save_pretrained(tmp_path / "unigendet-tiny")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_swaps_leave_the_readme_calls_intact():
    """Catches a swap that rewrites more than the weights and step counts (a stale test)."""
    block = readme_block()
    for call in ("aigid.train(", "aigid.load_detector(", "detector.predict(", "detector.predict_iter(",
                 "aigid.Batcher(", "batcher.submit(", "aigid.evaluate(",
                 "save_pretrained(", "UniGenDet.from_pretrained(", "model.explain(", "model.generate(",
                 "ops.supcon_bank_loss(", "ops.smsa_attention("):
        assert call in swapped(block)


def test_python_api_block_runs(readme_workdir):
    namespace: dict = {"torch": torch}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)
    exec(compile(swapped(readme_block()), str(README) + ":Python API", "exec"), namespace)
    assert namespace["p_fake"].shape == (1,) and 0 <= float(namespace["p_fake"][0]) <= 1
    assert 0 <= namespace["p"] <= 1  # the Batcher's score
    assert os.path.isfile(readme_workdir / "export" / "config.json")
    assert os.path.isfile(readme_workdir / "runs" / "mirage" / "model.safetensors")
    assert torch.isfinite(namespace["loss"]) and namespace["out"].shape == namespace["q"].shape
    assert isinstance(namespace["why"], str) and "auroc" in namespace["report"]["overall"]
