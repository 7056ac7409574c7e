"""The stages of ``aigid.scanning.ray``: what runs on the Ray workers (see scan_ray's docstring).

Data between stages is plain Arrow (no tensor extension types): ids are ``binary`` (raw bytes,
``utf-8``/``surrogateescape``: Arrow strings cannot hold a non-UTF-8 file name), pixels are the
bytes of one preprocessed image with its ``shape``.

- ``walk`` (one task, streaming): ``iter_units`` over all the paths (one walk, so overlapping
  paths count a file once, as ``aigid.scan``); plain files grouped ``items_per_task`` to a slice;
  archives passed on unexpanded; done ids left out here.
- ``expand`` (a task per archive): lists the members (one pass over the headers, nothing read)
  and cuts them into slices of ``items_per_task``; a compressed tar is one slice, since every
  slice of it would decompress the whole stream again.
- ``decode`` (a task per slice, ``num_cpus`` each): read (``read_items``: one pass per archive
  slice), hash, decode and preprocess; emits images in chunks of the model batch size.
- ``Scorer`` (the actor pool): one detector per actor, on the actor's GPU if Ray gave it one.

Files left out as not images are counted by extension (``sources.skip_key``) as the local
scanner's discovery (``aigid.data.decode_cpu.ScanDataset``) counts them, and reported to the
driver's tally actor with the done ids left out: without ``sniff``, by the extension filter of
``iter_units`` (walk) and ``stream_archive`` (expand), through their ``on_skip``; with ``sniff``
both list every file and member (``extensions=None``) and ``decode`` judges each one whose name
is no image extension by its first bytes (``sources.image_format``): a plain file's head is read
before the file (a big video is never read whole), a member's from the bytes read.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

__all__ = ["SLICE", "DECODED", "SCORED", "id_bytes", "id_key", "DoneSet", "walk", "expand",
           "decode", "Scorer"]

SLICE = pa.schema([("kind", pa.string()),  # files | archive | members | errors
                   ("source", pa.binary()),  # the archive (archive, members); else null
                   ("ids", pa.list_(pa.binary())), ("members", pa.list_(pa.binary())),
                   ("sizes", pa.list_(pa.int64())), ("reasons", pa.list_(pa.string()))])
DECODED = pa.schema([("id", pa.binary()), ("hash", pa.string()), ("size", pa.int64()),
                     ("error", pa.string()), ("evidence", pa.string()), ("pixels", pa.binary()),
                     ("shape", pa.list_(pa.int32()))])
SCORED = pa.schema([("id", pa.binary()), ("hash", pa.string()), ("size", pa.int64()),
                    ("score", pa.float64()), ("error", pa.string()), ("evidence", pa.string()),
                    ("actor", pa.string()), ("busy_s", pa.float64())])
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def id_bytes(ident: str) -> bytes:
    return ident.encode("utf-8", "surrogateescape")


def id_key(raw: bytes) -> bytes:
    """16 bytes standing for an id in the done set (a false match needs a 128-bit collision)."""
    return hashlib.blake2b(raw, digest_size=16).digest()


class DoneSet:
    """Membership in the ids already stored for this detector, on any worker.

    Holds an ``ObjectRef`` to a sorted ``S16`` array of ``id_key``s (16 bytes an id: 160 MB for
    10 M ids, shared zero-copy by the workers of a node); pickles as the ref alone."""

    def __init__(self, ref: Any = None):
        self.ref, self._keys = ref, None

    def __getstate__(self) -> dict:
        return {"ref": self.ref}

    def __setstate__(self, state: dict) -> None:
        self.ref, self._keys = state["ref"], None

    def __contains__(self, raw: bytes) -> bool:
        if self._keys is None:
            if self.ref is None:
                return False
            import ray
            self._keys = ray.get(self.ref)
        # Compared as fixed-width arrays: a numpy bytes scalar drops trailing NUL bytes, so a
        # key ending in 0x00 would never equal itself as plain bytes.
        key = np.array([id_key(raw)], dtype="S16")
        i = int(np.searchsorted(self._keys, key)[0])
        return i < len(self._keys) and bool(self._keys[i:i + 1] == key)


def done_keys(raw_ids: Iterator[bytes]) -> np.ndarray:
    """The sorted ``S16`` array of ``id_key``s of ``raw_ids`` (streamed in chunks)."""
    chunks, buf = [], []
    for raw in raw_ids:
        buf.append(id_key(raw))
        if len(buf) >= 1 << 16:
            chunks.append(np.array(buf, dtype="S16"))
            buf = []
    chunks.append(np.array(buf, dtype="S16"))
    keys = np.concatenate(chunks)
    keys.sort()
    return keys


def _slices(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SLICE)


def _slice(kind: str, source: Optional[bytes], ids=(), members=None, sizes=(), reasons=None) -> dict:
    return {"kind": kind, "source": source, "ids": list(ids), "members": members,
            "sizes": list(sizes), "reasons": reasons}


def _extensions(sniff: bool):
    """The extension filter of the enumeration, as ``ScanDataset``: none with ``sniff`` (every
    file and member is a candidate, the content decides), else the image extensions."""
    from aigid.data.sources import IMAGE_EXTENSIONS

    return None if sniff else IMAGE_EXTENSIONS


class _Tallied:
    """Counts the done ids left out and the files left out as not images (by extension), and
    reports them to the driver's tally actor (``flush``: before each output, and at the end)."""

    def __init__(self, done: Optional[DoneSet], tally: Any):
        self.done, self.tally, self.count = done, tally, 0
        self.not_images: Counter = Counter()

    def __call__(self, raw: bytes) -> bool:
        hit = self.done is not None and raw in self.done
        self.count += hit
        return hit

    def not_image(self, name: str) -> None:
        """``on_skip`` of ``iter_units``/``stream_archive``: one more file left out by its name."""
        from aigid.data.sources import skip_key

        self.not_images[skip_key(name)] += 1

    def sniffed_out(self, name: str, head: Optional[bytes]) -> bool:
        """With ``sniff``: whether a file or member whose name is no image extension holds no
        image either (then it is counted and left out); the rule of ``ScanDataset._not_image``.
        ``head``: its first bytes (None: unreadable, left to the reader to report)."""
        from aigid.data.sources import IMAGE_EXTENSIONS, SNIFF_BYTES, image_format

        if head is None or os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            return False
        if image_format(head[:SNIFF_BYTES]) is not None:
            return False
        self.not_image(name)
        return True

    def flush(self) -> None:
        if (self.count or self.not_images) and self.tally is not None:
            import ray
            # Waited for: counted before the task ends, so the driver's summary has it all.
            ray.get(self.tally.add.remote(self.count, dict(self.not_images)))
        self.count = 0
        self.not_images.clear()


def walk(batch: pa.Table, *, items_per_task: int, done: DoneSet, tally: Any,
         sniff: bool = False) -> Iterator[pa.Table]:
    """Stage 1: the paths (one row each) -> slices of plain files, archives, errors. Files left
    out by the extension filter (none with ``sniff``) are counted as not images."""
    from aigid.data.sources import Archive, ItemError, iter_units

    skip = _Tallied(done, tally)
    paths = [p.decode("utf-8", "surrogateescape") for p in batch.column("path").to_pylist()]
    files: list[tuple[bytes, Optional[int]]] = []
    errors: list[tuple[bytes, str]] = []
    out: list[dict] = []

    def flush_files() -> None:
        if files:
            out.append(_slice("files", None, [f[0] for f in files], None, [f[1] for f in files]))
            files.clear()

    for unit in iter_units(paths, extensions=_extensions(sniff), on_skip=skip.not_image):
        raw = id_bytes(unit.id)
        if isinstance(unit, Archive):
            out.append(_slice("archive", raw, sizes=[unit.size]))
        elif skip(raw):
            continue
        elif isinstance(unit, ItemError):
            errors.append((raw, unit.reason))
        else:
            files.append((raw, unit.size))
            if len(files) >= items_per_task:
                flush_files()
        if len(errors) >= items_per_task:
            out.append(_error_slice(errors))
            errors.clear()
        if len(out) >= 64:  # streamed: a walk of millions of files is never held whole
            skip.flush()
            yield _slices(out)
            out = []
    flush_files()
    if errors:
        out.append(_error_slice(errors))
    skip.flush()
    if out:
        yield _slices(out)


def _error_slice(errors: list[tuple[bytes, str]]) -> dict:
    """One slice of (id, reason) pairs that became error rows while listing."""
    return _slice("errors", None, [e[0] for e in errors], sizes=[None] * len(errors),
                  reasons=[e[1] for e in errors])


def expand(batch: pa.Table, *, items_per_task: int, done: DoneSet, tally: Any,
           sniff: bool = False) -> Iterator[pa.Table]:
    """Stage 2: each archive -> slices of its members (and its errors); other slices pass.
    Members left out by the extension filter (none with ``sniff``) are counted as not images."""
    from aigid.data.sources import ItemError, stream_archive

    skip = _Tallied(done, tally)
    for row in batch.to_pylist():
        if row["kind"] != "archive":
            yield _slices([row])
            continue
        source = row["source"]
        archive = source.decode("utf-8", "surrogateescape")
        whole = archive.lower().endswith(_COMPRESSED_TAR)
        members: list[tuple[bytes, bytes, Optional[int]]] = []
        errors: list[tuple[bytes, str]] = []
        out: list[dict] = []
        # fetch=None: headers only
        for got, _, reason in stream_archive(archive, extensions=_extensions(sniff),
                                             on_skip=skip.not_image):
            raw = id_bytes(got.id)
            if skip(raw):
                continue
            if isinstance(got, ItemError):
                errors.append((raw, reason))
                continue
            members.append((raw, id_bytes(got.member), got.size))
            if len(members) >= items_per_task and not whole:
                out.append(_member_slice(source, members))
                members = []
        if members:
            out.append(_member_slice(source, members))
        if errors:
            out.append(_error_slice(errors))
        skip.flush()  # also for an archive that held only non-images
        if out:
            yield _slices(out)


def _member_slice(source: bytes, members: list) -> dict:
    return _slice("members", source, [m[0] for m in members], [m[1] for m in members],
                  [m[2] for m in members])


def _split(preprocess: dict[str, Any]):
    """(per-image transform, per-batch normalise or None) as ``aigid.data.decode_cpu`` splits it:
    geometry to uint8 per image (4x fewer bytes through the object store), float + normalise on
    the scoring actor's device; variable-size preprocessing keeps the whole float transform."""
    from aigid.data.decode_cpu import _split_normalise
    from aigid.data.transforms import eval_transform

    transform = eval_transform(preprocess)
    split = _split_normalise(transform, preprocess)
    return (transform, None) if split is None else split


def decode(batch: pa.Table, *, preprocess: dict[str, Any], batch_size: int,
           evidence: bool = True, sniff: bool = False, tally: Any = None) -> Iterator[pa.Table]:
    """Stage 3: each slice -> rows of (id, hash, size, error, evidence, pixels, shape), read,
    hashed and preprocessed here (CPU); emitted in chunks of ``batch_size`` images. ``evidence``:
    the file's provenance evidence (``aigid.provenance.evidence_json``), as ``aigid.scan``.
    ``sniff``: a file or member whose name is no image extension is scored when its first bytes
    are an image signature, else left out and counted (``tally``) as not an image."""
    from aigid.data.decode_cpu import _head, decode_image
    from aigid.data.images import ImageError
    from aigid.data.sources import Item, content_hash, read_items
    from aigid.provenance import evidence_json

    judge = _Tallied(None, tally)
    transform, normalise = _split(preprocess)
    dtype = torch.uint8 if normalise is not None else torch.float32
    rows: list[dict] = []
    for sl in batch.to_pylist():
        if sl["kind"] == "errors":
            rows += [{"id": i, "size": s, "error": r} for i, s, r in
                     zip(sl["ids"], sl["sizes"], sl["reasons"])]
            continue
        source = sl["source"].decode("utf-8", "surrogateescape") if sl["source"] else None
        names = sl["members"] or [None] * len(sl["ids"])
        items = []
        for raw, member, size in zip(sl["ids"], names, sl["sizes"]):
            ident = raw.decode("utf-8", "surrogateescape")
            items.append(Item(ident, source or ident,
                              member.decode("utf-8", "surrogateescape") if member else None, size))
        if sniff and source is None:  # plain files: judged by their head before being read
            items = [it for it in items if not judge.sniffed_out(it.id, _head(it.source))]
        for item, data, reason in read_items(items):
            raw = id_bytes(item.id)
            if sniff and item.member is not None and judge.sniffed_out(item.member, data):
                continue
            if data is None:
                rows.append({"id": raw, "size": item.size, "error": reason or "unreadable"})
            else:
                row = {"id": raw, "hash": content_hash(data), "size": len(data),
                       "evidence": evidence_json(data) if evidence else None}  # never raises
                try:
                    px = decode_image(data, transform, dtype).contiguous()
                    row.update(pixels=px.numpy().tobytes(), shape=list(px.shape))
                except ImageError as err:
                    row["error"] = str(err)
                rows.append(row)
            if len(rows) >= batch_size:
                judge.flush()
                yield pa.Table.from_pylist(rows, schema=DECODED)
                rows = []
    judge.flush()  # also for a slice that held only non-images
    if rows:
        yield pa.Table.from_pylist(rows, schema=DECODED)


class Scorer:
    """Stage 4, a Ray actor: loads the detector once on its own device (CUDA when Ray gave it a
    GPU) and scores blocks of decoded images; checks the detector is the one the driver
    fingerprinted (``layout``), so rows are never stored under another detector's id."""

    def __init__(self, detector: str, layout: Optional[str], preprocess: dict[str, Any]):
        import ray

        from aigid.models.registry import load_detector
        from aigid.scanning.fingerprint import detector_layout

        gpus = ray.get_gpu_ids()
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        self.detector = load_detector(detector, device=str(self.device))
        check_ready = getattr(self.detector, "check_ready", None)
        if check_ready is not None:
            check_ready()
        if layout is not None and detector_layout(self.detector) != layout:
            raise RuntimeError(f"{detector}: the detector this worker loaded differs from the one "
                               "fingerprinted from the folder's files (config or tensors)")
        _, self.normalise = _split(preprocess)
        self.actor = ray.get_runtime_context().get_actor_id() or "driver"

    def predict(self, pixels: list[np.ndarray]) -> list[float]:
        """P(fake) for each preprocessed image (uint8 HWC, or float CHW when not split)."""
        from aigid.data.dataset import stack_images

        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if self.normalise is not None:  # uint8 (N, H, W, 3) -> normalised (N, 3, H, W)
                x = torch.from_numpy(np.stack(pixels)).to(self.device, non_blocking=True)
                batch = self.normalise(x.permute(0, 3, 1, 2).contiguous())
            else:  # copies: the Arrow buffers are read-only
                batch = stack_images([torch.from_numpy(p.copy()).to(self.device) for p in pixels])
            scores = self.detector.predict(batch)
        return torch.as_tensor(scores).detach().float().reshape(-1).cpu().tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from aigid.scanning.local import NO_VERDICT

        started = time.perf_counter()
        rows = batch.to_pylist()
        dtype = np.uint8 if self.normalise is not None else np.float32
        ok = [i for i, r in enumerate(rows) if r["pixels"] is not None]
        pixels = [np.frombuffer(rows[i]["pixels"], dtype).reshape(rows[i]["shape"]) for i in ok]
        scores = dict(zip(ok, self.predict(pixels))) if ok else {}
        out = []
        for i, r in enumerate(rows):
            s = scores.get(i)
            error = r["error"] if i not in scores else (None if s == s else NO_VERDICT)
            out.append({"id": r["id"], "hash": r["hash"], "size": r["size"],
                        "score": s if error is None else None, "error": error,
                        "evidence": r["evidence"]})
        busy = (time.perf_counter() - started) / max(1, len(out))
        for rec in out:
            rec["actor"], rec["busy_s"] = self.actor, busy
        return pa.Table.from_pylist(out, schema=SCORED)
