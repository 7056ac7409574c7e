"""Read a C2PA manifest's claims with ``c2pa-python`` (the optional extra ``aigid[c2pa]``).

Only called when ``jumbf`` found a manifest store in the bytes, so images without one never load
the native library. Network is off: no remote manifest fetch, no OCSP (aigid reaches the network
only when asked). The active manifest's claim generator, the ``digitalSourceType`` of its actions
(``c2pa.created`` with ``trainedAlgorithmicMedia`` marks a generated image) and the SDK's
validation state (``Invalid`` / ``Valid`` / ``Trusted``; with no trust list configured a good
signature is ``Valid``) are kept. Manifest JSON layout: c2pa-rs ``Reader::json`` (docs:
https://opensource.contentauthenticity.org/docs/manifest/understanding-manifest).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from functools import lru_cache
from typing import Any

from aigid.provenance.xmp import short_type

__all__ = ["available", "read_manifest"]

_OFFLINE = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_MAX_ERRORS = 5


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether ``c2pa-python`` is installed (checked once, without importing it)."""
    return importlib.util.find_spec("c2pa") is not None


_CONTEXT: dict[int, Any] = {}  # per process: a native handle must not cross a fork


def _context() -> Any:
    import c2pa

    pid = os.getpid()
    if pid not in _CONTEXT:
        _CONTEXT.clear()
        _CONTEXT[pid] = c2pa.Context(settings=c2pa.Settings.from_dict(_OFFLINE))
    return _CONTEXT[pid]


def _generator(manifest: dict) -> str | None:
    if manifest.get("claim_generator"):
        return str(manifest["claim_generator"])[:200]
    infos = manifest.get("claim_generator_info") or []
    names = [" ".join(str(i.get(k, "")) for k in ("name", "version")).strip()
             for i in infos if isinstance(i, dict)]
    return "; ".join(n for n in names if n)[:200] or None


def _actions(manifest: dict) -> list[dict]:
    out = []
    for assertion in manifest.get("assertions") or []:
        if not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            if isinstance(action, dict):
                item = {"action": str(action.get("action", ""))[:100]}
                if action.get("digitalSourceType"):
                    item["digital_source_type"] = short_type(str(action["digitalSourceType"]))
                out.append(item)
    return out


def _errors(store: dict) -> list[str]:
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = results.get("failure") or store.get("validation_status") or []
    return [str(f.get("code", f)) for f in failures if isinstance(f, dict)][:_MAX_ERRORS]


def read_manifest(data: bytes, mime: str) -> dict:
    """``claim_generator``, ``actions`` (with ``digital_source_type``), ``validation_state``,
    ``validation_errors`` of the active manifest; ``{"read_error": ...}`` when the SDK fails."""
    import c2pa

    try:
        with c2pa.Reader(mime, io.BytesIO(data), context=_context()) as reader:
            store = json.loads(reader.json())
    except Exception as err:  # the SDK's errors and anything a hostile manifest provokes
        return {"read_error": f"{type(err).__name__}: {str(err)[:300]}"}
    manifest = (store.get("manifests") or {}).get(store.get("active_manifest") or "") or {}
    out: dict[str, Any] = {"validation_state": store.get("validation_state")}
    if (generator := _generator(manifest)) is not None:
        out["claim_generator"] = generator
    actions = _actions(manifest)
    if actions:
        out["actions"] = actions
    errors = _errors(store)
    if errors:
        out["validation_errors"] = errors
    return out
