"""The shipped JSON configs (``<kind>-<name>.json`` beside this file), read by name."""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["shipped_config", "shipped_names"]

_LABELS = {"mot": "MoT", "mirage": "MiraGe", "unigendet": "UniGenDet"}


def shipped_names(kind: str) -> list[str]:
    """Names of the shipped configs of one kind (``mirage``, ``unigendet``, ``mot``)."""
    folder = resources.files(__name__)
    return sorted(p.name[len(kind) + 1:-5] for p in folder.iterdir()
                  if p.name.startswith(kind + "-") and p.name.endswith(".json"))


def shipped_config(kind: str, name: str) -> dict[str, Any]:
    """The parsed ``<kind>-<name>.json``; an unknown name raises ValueError listing the choices."""
    path = resources.files(__name__) / f"{kind}-{name}.json"
    if not path.is_file():
        label = _LABELS.get(kind, kind)
        raise ValueError(f"no shipped {label} config {name!r} ({', '.join(shipped_names(kind))})")
    return json.loads(path.read_text())
