"""A torch Dataset over labelled images that never crashes on a bad file.

A file that cannot be decoded comes back as an error (index, reason) instead of a tensor; the
collate function drops it from the batch and hands the errors to the caller to report.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

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


def stack_images(rows: Sequence[torch.Tensor]) -> Union[torch.Tensor, list[torch.Tensor]]:
    """One (N, 3, H, W) tensor when every image has the same size; else the list as it is (a
    detector whose preprocessing keeps each image's aspect, UniGenDet, takes lists)."""
    if len({tuple(r.shape) for r in rows}) <= 1:
        return torch.stack(list(rows))
    return list(rows)


def collate_skipping_errors(batch: list[dict[str, Any]]) -> dict[str, Any]:
    good = [b for b in batch if b["error"] is None]
    return {
        "pixels": stack_images([b["pixels"] for b in good]) if good else None,
        "labels": torch.tensor([b["label"] for b in good], dtype=torch.long),
        "indices": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "errors": [(b["index"], b["error"]) for b in batch if b["error"] is not None],
    }
