"""Find labelled images on disk, in the layouts users already have.

Labels come from folder *names*, never from sort order (torchvision's ImageFolder would make
GenImage's ``ai`` 0 and ``nature`` 1). Recognised leaves, any case: ``real``/``fake``,
``0_real``/``1_fake`` (ForenSynths, UnivFD), ``nature``/``ai`` (GenImage). They are found at any
depth, so GenImage's inner folders (``ADM/imagenet_ai_0508_adm/train/ai``) need no renaming; the
generator is the first folder below the root (``""`` when the label folders sit at the root).
A CSV (``path,label[,generator]``) or JSONL manifest is accepted too; relative paths in it are
relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

REAL, FAKE = 0, 1
LABEL_DIRS = {"real": REAL, "0_real": REAL, "nature": REAL, "fake": FAKE, "1_fake": FAKE, "ai": FAKE}
SPLIT_DIRS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class LabelledImage:
    path: str
    label: int       # 0 real, 1 fake
    generator: str   # "" when the dataset has a single source


def _label_of(value: str) -> int:
    v = str(value).strip().lower()
    if v in ("0", "1"):
        return int(v)
    if v in LABEL_DIRS:
        return LABEL_DIRS[v]
    raise ValueError(f"unknown label {value!r} (use 0/1, real/fake, nature/ai, 0_real/1_fake)")


def _from_manifest(path: str) -> list[LabelledImage]:
    base = os.path.dirname(os.path.abspath(path))
    rows: Iterable[dict]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f)) if path.endswith(".csv") else [json.loads(l) for l in f if l.strip()]
    out = []
    for i, row in enumerate(rows):
        if "path" not in row or "label" not in row:
            raise ValueError(f"{path}: row {i + 1} needs 'path' and 'label' fields, got {sorted(row)}")
        p = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
        out.append(LabelledImage(p, _label_of(row["label"]), str(row.get("generator") or "")))
    return out


def discover(root: str, split: Optional[str] = None) -> list[LabelledImage]:
    """Every labelled image under ``root`` (or in a manifest file), sorted by path.

    ``split`` keeps only images with a path component equal to it (``train``/``val``/``test``).
    """
    if os.path.isfile(root):
        items = _from_manifest(root)
        return [s for s in items if split is None or split in s.path.split(os.sep)]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such dataset folder or manifest: {root}")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked folders
        dirnames.sort()
        parts = os.path.relpath(dirpath, root).split(os.sep)
        parts = [] if parts == ["."] else parts
        label_at = [i for i, p in enumerate(parts) if p.lower() in LABEL_DIRS]
        if not label_at or (split is not None and split not in parts):
            continue
        label = LABEL_DIRS[parts[label_at[-1]].lower()]
        generator = parts[0] if label_at[-1] > 0 and parts[0] not in SPLIT_DIRS else ""
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                items.append(LabelledImage(os.path.join(dirpath, name), label, generator))
    return items


def has_split(root: str, split: str) -> bool:
    return bool(discover(root, split)) if os.path.exists(root) else False


def summarise(items: list[LabelledImage]) -> dict:
    """Counts per generator and label, and a warning if reals and fakes differ in file format."""
    counts = Counter((s.generator, s.label) for s in items)
    per_gen: dict = {}
    for (gen, label), n in sorted(counts.items()):
        per_gen.setdefault(gen or "all", {"real": 0, "fake": 0})["real" if label == REAL else "fake"] = n
    return {"total": len(items), "per_generator": per_gen}


def format_bias(items: list[LabelledImage]) -> Optional[str]:
    """GenImage's reals are JPEG and its fakes mostly PNG: a detector can learn the codec instead."""
    def share_jpeg(label):
        exts = [os.path.splitext(s.path)[1].lower() for s in items if s.label == label]
        return sum(e in (".jpg", ".jpeg") for e in exts) / max(1, len(exts))
    real, fake = share_jpeg(REAL), share_jpeg(FAKE)
    if abs(real - fake) > 0.5:
        return (f"format bias: {real:.0%} of reals but {fake:.0%} of fakes are JPEG; the detector "
                "may learn the file format (consider re-encoding both classes the same way)")
    return None


def warn_format_bias(items: list[LabelledImage]) -> None:
    msg = format_bias(items)
    if msg:
        warnings.warn(msg, stacklevel=2)
