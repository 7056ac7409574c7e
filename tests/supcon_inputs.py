"""Inputs for the SupCon kernel tests (tiled and one-program paths): unit-norm embeddings and
integer labels in the patterns that exercise the loss's edge cases."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_inputs(n: int, a: int, m: int, d: int, *, labels: str = "random", n_cls: int = 2,
                  seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device = torch.device("cpu")):
    """(feats, anchors, bank) in ``dtype`` and int64 (labels, anchor_labels, bank_labels).

    ``labels``: "random" (``n_cls`` classes), "same" (one class), "distinct" (every key its own
    class: no row has a positive), "large" (negative ids and ids > 2**32 that collide if
    truncated to 32 bits), "some_alone" (even rows alone in their class, odd rows share one).
    """
    g = torch.Generator().manual_seed(seed)
    feats, anchors, bank = (F.normalize(torch.randn(k, d, generator=g), dim=1) for k in (n, a, m))
    if labels == "random":
        y, ya, yb = (torch.randint(0, n_cls, (k,), generator=g) for k in (n, a, m))
    elif labels == "same":
        y, ya, yb = (torch.full((k,), 7) for k in (n, a, m))
    elif labels == "distinct":
        ids = torch.randperm(n + a + m, generator=g) * 13 - 40
        y, ya, yb = ids[:n], ids[n:n + a], ids[n + a:]
    elif labels == "large":
        pool = torch.tensor([-3, 5, 2**32 + 5, -2**33 - 3, 2**40])
        y, ya, yb = (pool[torch.randint(0, len(pool), (k,), generator=g)] for k in (n, a, m))
    elif labels == "some_alone":
        y = torch.where(torch.arange(n) % 2 == 0, 100 + torch.arange(n), 1)
        ya = torch.ones(a, dtype=torch.long)
        yb = torch.randint(0, 3, (m,), generator=g)
    else:
        raise ValueError(labels)
    return (*(t.to(device=device, dtype=dtype) for t in (feats, anchors, bank)),
            *(t.to(device) for t in (y, ya, yb)))
