"""A torch Dataset over labelled images that never crashes on a bad file.

A file that cannot be decoded comes back as an error (index, reason) instead of a tensor; the
collate function drops it from the batch and hands the errors to the caller to report.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from aigid.data.images import ImageError, load_rgb
from aigid.data.labelled import LabelledImage


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[LabelledImage], transform: Callable):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            pixels = self.transform(load_rgb(item.path))
        except ImageError as err:
            return {"index": index, "label": item.label, "pixels": None, "error": str(err)}
        return {"index": index, "label": item.label, "pixels": pixels, "error": None}


def collate_skipping_errors(batch: list[dict[str, Any]]) -> dict[str, Any]:
    good = [b for b in batch if b["error"] is None]
    return {
        "pixels": torch.stack([b["pixels"] for b in good]) if good else None,
        "labels": torch.tensor([b["label"] for b in good], dtype=torch.long),
        "indices": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "errors": [(b["index"], b["error"]) for b in batch if b["error"] is not None],
    }
