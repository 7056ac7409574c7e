"""Readers for UniGenDet's training data in the public formats, as random-access row indexes.

Detection (``fakeclue``): FakeClue/FakeVLM's LLaVA-style annotations, read as upstream's
``DetectionSftJSONLIterableDataset`` (``data/detection_json_dataset.py``) reads them — a JSON list
(or JSONL, one object a line) of ``{"image": relative path, "label": 0|1, "conversations":
[{"from": "human", "value": "<image>\\n question"}, {"from": "gpt", "value": "This is a fake
image. ..."}]}`` with images under an image root. **Upstream labels are 1 = real, 0 = fake** (the
public ``eval/det/fakevlm_test.py`` maps "this is a real image" to 1); they are turned into aigid's
(1 = fake) here. The question is the first human turn with ``<image>`` removed (as that eval
script builds it), the explanation the first gpt turn after it. ``balance=True`` keeps as many
real as fake rows (the smaller count; upstream always balances).

Generation: webdataset-style ``tar`` shards (``key.jpg``/``.png``/``.webp`` + ``key.txt`` or
``key.json`` sharing the key: the member name up to the first dot of its basename), ``parquet``
files as BAGEL's ``T2IIterableDataset`` (``data/t2i_dataset.py``) reads them — an ``image``
column of encoded bytes (or a ``{"bytes": ...}`` struct, as Hugging Face datasets store images)
and a ``captions`` column holding a JSON object of captions, one picked per epoch (a plain
``caption``/``prompt``/``text`` string column also works) — and ``t2i-json``, UniGenDet's own
t2i metadata (``[{"image_path": ..., "prompt": ...}]`` under an image root).

Every source is an index of units ``(file, row)`` in a fixed order (files sorted); ``read(unit,
epoch)`` gives the raw record (image path or bytes + text) without decoding the image.
Malformed rows found while indexing (bad JSON line, no answer, no label, tar member without a
caption) are left out of the index and counted in ``index_counts``; nothing here raises for one
bad row. A file that cannot be opened at all is an error: that is a wrong path, not a bad sample.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

__all__ = ["Unit", "DetectionRecord", "CaptionRecord", "FakeClueSource", "TarShardSource", "ParquetSource",
           "T2IJsonSource", "open_source", "FORMATS"]

log = logging.getLogger(__name__)

Unit = tuple[int, int]                      # (file index, row index within the file)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_KEYS = ("caption", "prompt", "text", "txt")


@dataclass
class DetectionRecord:
    image: str                              # resolved path
    label: int                              # aigid: 1 = fake, 0 = real
    question: str
    explanation: str


@dataclass
class CaptionRecord:
    image: Union[str, bytes]                # a path or the encoded image
    caption: str


def _files(paths: Union[str, Sequence[str]], exts: tuple[str, ...]) -> list[str]:
    """Files named, or found (sorted, non-recursive) in folders named, with one of ``exts``."""
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            out += sorted(os.path.join(p, n) for n in os.listdir(p) if n.lower().endswith(exts))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such data file or folder")
    if not out:
        raise FileNotFoundError(f"{paths}: no {'/'.join(exts)} files")
    return out


def _json_rows(path: str, counts: Counter) -> list[Any]:
    """A JSON list's rows, or a JSONL file's; a JSONL line that does not parse is counted
    (``bad_json``) and kept as None, so a row is its non-blank line's number."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        rows = json.loads(text)                 # a broken JSON list is a broken file: raise
        return rows if isinstance(rows, list) else [rows]
    out: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            counts["bad_json"] += 1
            out.append(None)
    return out


def _caption_from_json(obj: Any, pick: random.Random) -> str:
    """A caption from a JSON value: a string, a dict with a caption-like key, or BAGEL's
    ``captions`` dict of alternatives (one picked)."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for k in CAPTION_KEYS:
            if isinstance(obj.get(k), str):
                return obj[k]
        caps = obj.get("captions", obj)
        if isinstance(caps, str):
            caps = json.loads(caps)
        texts = [v for v in caps.values() if isinstance(v, str)] if isinstance(caps, dict) else []
        if texts:
            return pick.choice(texts)
    return ""


def _pick(seed: int, unit: Unit, epoch: int) -> random.Random:
    # A pure function of the unit and epoch: a sample reloaded after a resume picks the same caption.
    return random.Random(f"aigid-caption:{seed}:{unit[0]}:{unit[1]}:{epoch}")


class _Source:
    kind: str                               # "det" or "gen"
    granularity: str                        # "row": shuffle rows; "file": shuffle files, rows in order

    def __init__(self) -> None:
        self.files: list[str] = []
        self.units: list[Unit] = []
        self.index_counts: Counter = Counter()

    def describe(self, unit: Unit) -> str:
        return f"{self.files[unit[0]]}#{unit[1]}"

    def fingerprint(self) -> dict[str, Any]:
        return {"files": [os.path.basename(f) for f in self.files], "units": len(self.units)}


# ---- detection --------------------------------------------------------------------------------
class FakeClueSource(_Source):
    kind, granularity = "det", "row"

    def __init__(self, paths: Union[str, Sequence[str]], image_root: Optional[str] = None,
                 balance: bool = False, seed: int = 0):
        super().__init__()
        self.files = _files(paths, (".json", ".jsonl"))
        self.image_root = image_root
        self._rows: list[DetectionRecord] = []
        for fi, path in enumerate(self.files):
            root = image_root if image_root is not None else os.path.dirname(path)
            for ri, raw in enumerate(_json_rows(path, self.index_counts)):
                rec = self._record(raw, root)
                if rec is not None:
                    self.units.append((fi, ri))
                    self._rows.append(rec)
        if balance:
            self._balance(seed)
        self._at = {u: i for i, u in enumerate(self.units)}
        if not self.units:
            raise ValueError(f"{paths}: no usable detection rows ({dict(self.index_counts)})")

    def _record(self, raw: Any, root: str) -> Optional[DetectionRecord]:
        if raw is None:
            return None                         # counted as bad_json already
        if not isinstance(raw, dict) or not isinstance(raw.get("image"), str) \
                or not isinstance(raw.get("conversations"), list):
            self.index_counts["bad_record"] += 1
            return None
        if raw.get("label") not in (0, 1) or isinstance(raw.get("label"), bool):
            self.index_counts["bad_label"] += 1
            return None
        question, answer = None, None
        for turn in raw["conversations"]:
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                continue
            if turn.get("from") == "human" and question is None:
                question = turn["value"].replace("<image>", "").strip()
            elif turn.get("from") == "gpt" and question is not None:
                answer = turn["value"].strip()
                break
        if question is None:
            self.index_counts["bad_record"] += 1
            return None
        if not answer:
            self.index_counts["empty_answer"] += 1
            return None
        # upstream 1 = real, 0 = fake → aigid 1 = fake
        return DetectionRecord(os.path.join(root, raw["image"]), 1 - int(raw["label"]), question, answer)

    def _balance(self, seed: int) -> None:
        order = list(range(len(self.units)))
        random.Random(f"aigid-balance:{seed}").shuffle(order)
        n = min(sum(r.label == lab for r in self._rows) for lab in (0, 1))
        taken: Counter = Counter()
        keep = []
        for i in order:
            if taken[self._rows[i].label] < n:
                taken[self._rows[i].label] += 1
                keep.append(i)
        keep.sort()                             # the index keeps file order; the stream shuffles
        self.index_counts["unbalanced_dropped"] += len(self.units) - len(keep)
        self.units = [self.units[i] for i in keep]
        self._rows = [self._rows[i] for i in keep]

    def read(self, unit: Unit, epoch: int = 0) -> DetectionRecord:
        return self._rows[self._at[unit]]


# ---- generation -------------------------------------------------------------------------------
class TarShardSource(_Source):
    kind, granularity = "gen", "file"

    def __init__(self, paths: Union[str, Sequence[str]], seed: int = 0):
        super().__init__()
        self.seed = seed
        self.files = _files(paths, (".tar",))
        self._members: list[list[tuple[str, Optional[str]]]] = []   # per shard: (image, caption) names
        for fi, path in enumerate(self.files):
            with tarfile.open(path) as tf:
                groups: dict[str, dict[str, str]] = {}
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    head, base = os.path.split(m.name)
                    key, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(head, key), {})[ext.lower()] = m.name
            rows = []
            for key, by_ext in groups.items():
                image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
                caption = by_ext.get("txt") or by_ext.get("json")
                if image is None:
                    self.index_counts["no_image"] += 1
                elif caption is None:
                    self.index_counts["no_caption"] += 1
                else:
                    rows.append((image, caption))
            self.units += [(fi, ri) for ri in range(len(rows))]
            self._members.append(rows)
        self._open: Optional[tuple[int, tarfile.TarFile]] = None   # one shard open at a time
        if not self.units:
            raise ValueError(f"{paths}: no image + caption pairs in the tar shards ({dict(self.index_counts)})")

    def _tar(self, fi: int) -> tarfile.TarFile:
        if self._open is None or self._open[0] != fi:
            self.close()
            self._open = (fi, tarfile.open(self.files[fi]))
        return self._open[1]

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def read(self, unit: Unit, epoch: int = 0) -> CaptionRecord:
        image, caption = self._members[unit[0]][unit[1]]
        tf = self._tar(unit[0])
        data = tf.extractfile(image).read()
        text = tf.extractfile(caption).read().decode("utf-8", errors="replace")
        if caption.lower().endswith(".json"):
            try:
                text = _caption_from_json(json.loads(text), _pick(self.seed, unit, epoch))
            except (json.JSONDecodeError, AttributeError):
                text = ""
        return CaptionRecord(data, text.strip())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}  # open files stay with their process


class ParquetSource(_Source):
    kind, granularity = "gen", "file"

    def __init__(self, paths: Union[str, Sequence[str]], image_column: str = "image",
                 caption_column: Optional[str] = None, seed: int = 0):
        super().__init__()
        import pyarrow.parquet as pq  # the [parquet] extra

        self.seed, self.image_column = seed, image_column
        self.files = _files(paths, (".parquet",))
        self._starts: list[list[int]] = []      # per file: first row of each row group
        self._captions: list[str] = []
        for fi, path in enumerate(self.files):
            meta = pq.ParquetFile(path)
            names = meta.schema_arrow.names
            if image_column not in names:
                raise ValueError(f"{path}: no {image_column!r} column (columns: {names})")
            col = caption_column or next((c for c in ("captions",) + CAPTION_KEYS if c in names), None)
            if col is None or col not in names:
                raise ValueError(f"{path}: no caption column (captions/caption/prompt/text; columns: {names})")
            self._captions.append(col)
            starts, n = [], 0
            for g in range(meta.num_row_groups):
                starts.append(n)
                n += meta.metadata.row_group(g).num_rows
            self._starts.append(starts)
            self.units += [(fi, r) for r in range(n)]
        self._cache: Optional[tuple[int, int, list, list]] = None  # (file, group, images, captions)
        if not self.units:
            raise ValueError(f"{paths}: empty parquet files")

    def _group(self, fi: int, gi: int) -> tuple[list, list]:
        if self._cache is None or self._cache[:2] != (fi, gi):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.files[fi]).read_row_group(
                gi, columns=[self.image_column, self._captions[fi]])
            self._cache = (fi, gi, table.column(0).to_pylist(), table.column(1).to_pylist())
        return self._cache[2], self._cache[3]

    def read(self, unit: Unit, epoch: int = 0) -> CaptionRecord:
        fi, row = unit
        gi = bisect.bisect_right(self._starts[fi], row) - 1
        images, captions = self._group(fi, gi)
        image, raw = images[row - self._starts[fi][gi]], captions[row - self._starts[fi][gi]]
        if isinstance(image, dict):             # Hugging Face Image feature: {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        if not isinstance(image, (bytes, str)):
            image = b""                         # fails to decode: counted as a corrupt image
        caption = raw if isinstance(raw, str) else ""
        if self._captions[fi] == "captions" and isinstance(raw, str):
            try:
                caption = _caption_from_json(json.loads(raw), _pick(self.seed, unit, epoch))
            except json.JSONDecodeError:
                caption = ""
        return CaptionRecord(image, caption.strip())


class T2IJsonSource(_Source):
    """UniGenDet's own t2i metadata (``final_metadata.json``): ``image_path`` + ``prompt``."""
    kind, granularity = "gen", "row"

    def __init__(self, paths: Union[str, Sequence[str]], image_root: Optional[str] = None):
        super().__init__()
        self.files = _files(paths, (".json", ".jsonl"))
        self._rows: dict[Unit, CaptionRecord] = {}
        for fi, path in enumerate(self.files):
            root = image_root if image_root is not None else os.path.dirname(path)
            for ri, raw in enumerate(_json_rows(path, self.index_counts)):
                if raw is None:
                    continue
                if not isinstance(raw, dict) or not isinstance(raw.get("image_path"), str):
                    self.index_counts["bad_record"] += 1
                    continue
                self.units.append((fi, ri))
                self._rows[(fi, ri)] = CaptionRecord(os.path.join(root, raw["image_path"]),
                                                     str(raw.get("prompt") or "").strip())
        if not self.units:
            raise ValueError(f"{paths}: no usable t2i rows ({dict(self.index_counts)})")

    def read(self, unit: Unit, epoch: int = 0) -> CaptionRecord:
        return self._rows[unit]


FORMATS = {"fakeclue": FakeClueSource, "tar": TarShardSource, "parquet": ParquetSource, "t2i-json": T2IJsonSource}


def _guess_format(path: str, kind: str) -> str:
    probe = path
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        probe = next((n for n in names if n.endswith((".tar", ".parquet", ".json", ".jsonl"))), path)
    if probe.endswith(".tar"):
        return "tar"
    if probe.endswith(".parquet"):
        return "parquet"
    return "fakeclue" if kind == "det" else "t2i-json"


def open_source(spec: Union[str, dict[str, Any]], kind: str, seed: int = 0) -> _Source:
    """A source from a data-config entry: a path, or ``{"path": ..., "format": ..., "image_root":
    ..., "balance": ..., "image_column": ..., "caption_column": ...}`` (format guessed from the
    extension when absent; relative to nothing — resolve paths before)."""
    spec = {"path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
    path = spec.pop("path")
    fmt = spec.pop("format", None) or _guess_format(path if isinstance(path, str) else path[0], kind)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (one of {sorted(FORMATS)})")
    cls = FORMATS[fmt]
    if cls.kind != kind:
        raise ValueError(f"format {fmt!r} holds {cls.kind} data, not {kind} data")
    if cls in (FakeClueSource, TarShardSource, ParquetSource):
        spec.setdefault("seed", seed)
    try:
        return cls(path, **spec)
    except TypeError as err:
        raise ValueError(f"{fmt} source: {err}") from None
