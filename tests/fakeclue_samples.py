"""Tiny UniGenDet training samples in the public formats: noise PNGs, FakeClue rows, tar shards.

Shared by the data tests and the distributed-runner test (``tests/`` is on ``sys.path`` under
pytest's default import mode, as for ``adversarial_corpus``).
"""
import io
import tarfile

import numpy as np
from PIL import Image

QUESTION = "Does the image looks real/fake?"


def noise_png(w: int, h: int, seed: int) -> bytes:
    px = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


def fakeclue_row(name: str, upstream_label: int, answer=None, question: str = f"<image>\n{QUESTION}") -> dict:
    """One FakeClue conversation row; upstream labels 1 = real, 0 = fake."""
    verdict = "real" if upstream_label == 1 else "fake"
    return {"image": name, "label": upstream_label, "cate": "test",
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": f"This is a {verdict} image. Because." if answer is None
                               else answer}]}


def write_tar(path, members) -> None:
    """A tar shard of (name, bytes) members."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
