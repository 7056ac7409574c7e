"""aigid: kernel-accelerated detection of AI-generated images.

    import aigid
    detector = aigid.load_detector("runs/mirage")        # a folder written by save_pretrained
    p_fake = detector.predict(["a.jpg", "b.png"])          # the detector applies its own preprocessing
    summary = aigid.train({"data": "my_set/", "model": "vit-l-14"})
    for r in aigid.scan(["photos/", "shard.tar"], detector, out="results.sqlite"): ...
    with aigid.Batcher(detector, max_batch_size=32, max_wait_ms=5) as b:   # inside a service
        p = b.submit("c.jpg").result()
"""
from __future__ import annotations

from aigid.evaluation.runner import evaluate
from aigid.models.registry import load_detector
from aigid.scanning.local import scan
from aigid.serving.batcher import Batcher
from aigid.training.mirage import TrainConfig, train
from aigid.version import __version__


def __getattr__(name: str):
    # The detector classes load open_clip and torchvision (~1 s): only when first asked for.
    if name in ("MiraGe", "MiraGeConfig"):
        from aigid.models import mirage
        return getattr(mirage, name)
    raise AttributeError(f"module 'aigid' has no attribute {name!r}")


__all__ = ["load_detector", "train", "evaluate", "scan", "Batcher", "MiraGe", "MiraGeConfig", "TrainConfig",
           "__version__"]
