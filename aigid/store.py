"""The results store of ``aigid scan``: one SQLite file, safe to kill at any moment.

Tables::

    results(id, model, hash, size, score, label, error, time)   PRIMARY KEY (id, model)
    runs(run, model, detector, preprocess, threshold, version, decoder, paths, started, finished,
         summary)

Several detectors may share one file: a row is keyed by (item id, model fingerprint). The file is
in WAL mode with ``synchronous=NORMAL`` and every ``write`` is one transaction, so a killed process
loses at most the batch it had not committed yet -- never half of one -- and readers (resume
checks in worker processes, ``aigid export``) never block the writer.

Ids that are not valid Unicode text (a non-UTF-8 file name, which ``os.fsdecode`` turns into lone
surrogates such as ``"caf\\udce9.jpg"``) cannot be UTF-8 encoded, so they are stored as a BLOB of
their raw bytes (``encode("utf-8", "surrogateescape")``): exact, unique and stable across runs,
and ``os.fsdecode(blob)`` gives the id back. Exports show such an id with ``backslashreplace``
(``caf\\xe9.jpg``); every other id is stored and exported unchanged.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

__all__ = ["ResultRow", "ResultStore", "DoneFilter", "encode_id", "decode_id", "display_id",
           "EXPORT_FORMATS", "COLUMNS"]

COLUMNS = ("id", "model", "hash", "size", "score", "label", "error", "time")
EXPORT_FORMATS = ("jsonl", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
             ".pq": "parquet"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT NOT NULL, model TEXT NOT NULL, hash TEXT, size INTEGER, score REAL, label INTEGER,
    error TEXT, time REAL, PRIMARY KEY (id, model)
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, detector TEXT, preprocess TEXT,
    threshold REAL, version TEXT, decoder TEXT, paths TEXT, started REAL, finished REAL,
    summary TEXT
);
"""
# On conflict the newer result wins: that is how --retry-errors replaces an error row.
_UPSERT = ("INSERT INTO results (id, model, hash, size, score, label, error, time) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id, model) DO UPDATE SET "
           "hash=excluded.hash, size=excluded.size, score=excluded.score, label=excluded.label, "
           "error=excluded.error, time=excluded.time")


@dataclass
class ResultRow:
    """One row of ``results`` (``score``/``label`` are None for an error, ``error`` for a score)."""
    id: str
    model: str
    hash: Optional[str]
    size: Optional[int]
    score: Optional[float]
    label: Optional[int]
    error: Optional[str]
    time: float


def encode_id(ident: str) -> Union[str, bytes]:
    """The SQLite value of an id: itself, or its raw bytes when it carries surrogate escapes."""
    try:
        ident.encode("utf-8")
        return ident
    except UnicodeEncodeError:
        return ident.encode("utf-8", "surrogateescape")


def decode_id(value: Union[str, bytes]) -> str:
    """The inverse of ``encode_id``: the id exactly as ``aigid.data.sources`` yields it."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def display_id(value: Union[str, bytes]) -> str:
    """Printable, valid-UTF-8 form of a stored id (raw bytes shown as ``\\xNN``)."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, timeout=60,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r}); is it on a "
                               "network filesystem?")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _uri_path(path: str) -> str:
    from urllib.parse import quote
    return quote(os.path.abspath(path), safe="/")


class ResultStore:
    """The SQLite results file. Not shared across processes for writing (one writer per file)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"folder of the results file does not exist: {parent}")
        self.conn = _connect(self.path)
        with self.conn:
            self.conn.executescript(_SCHEMA)

    # ---- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------
    def write(self, rows: Iterable[ResultRow]) -> int:
        """Insert or replace ``rows`` in one transaction (all or nothing); returns the count."""
        values = [(encode_id(r.id), r.model, r.hash, r.size, r.score, r.label, r.error, r.time)
                  for r in rows]
        with self.conn:  # BEGIN ... COMMIT, or ROLLBACK on any exception
            self.conn.executemany(_UPSERT, values)
        return len(values)

    def start_run(self, model: str, *, detector: Any = None, preprocess: Any = None,
                  threshold: Optional[float] = None, decoder: Optional[str] = None,
                  paths: Sequence[str] = ()) -> int:
        """Record what this run uses (detector, preprocessing, threshold, version...); its id."""
        from aigid import __version__

        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO runs (model, detector, preprocess, threshold, version, decoder, "
                "paths, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (model, _json(detector), _json(preprocess), threshold, __version__, decoder,
                 _json([display_id(encode_id(os.fsdecode(p))) for p in paths]), time.time()))
        return int(cur.lastrowid)

    def finish_run(self, run: int, summary: dict[str, Any]) -> None:
        with self.conn:
            self.conn.execute("UPDATE runs SET finished=?, summary=? WHERE run=?",
                              (time.time(), _json(summary), run))

    # ---- reading -------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM runs ORDER BY run")
        names = [d[0] for d in cur.description]
        out = []
        for row in cur:
            rec = dict(zip(names, row))
            for key in ("detector", "preprocess", "paths", "summary"):
                rec[key] = json.loads(rec[key]) if rec[key] is not None else None
            out.append(rec)
        return out

    def models(self) -> list[str]:
        return [m for (m,) in self.conn.execute("SELECT DISTINCT model FROM results ORDER BY model")]

    def count(self, model: Optional[str] = None, *, errors: Optional[bool] = None) -> int:
        where, args = _where(model, errors)
        return self.conn.execute(f"SELECT COUNT(*) FROM results{where}", args).fetchone()[0]

    def done_ids(self, model: str, *, include_errors: bool = True) -> set[str]:
        """Every id finished for ``model`` (about 150 MB of Python strings per million ids; the
        scanner uses the constant-memory ``done_filter`` instead)."""
        sql = "SELECT id FROM results WHERE model=?" + ("" if include_errors else " AND error IS NULL")
        return {decode_id(v) for (v,) in self.conn.execute(sql, (model,))}

    def done_in_archive(self, model: str, archive: str, *, include_errors: bool = True) -> list[str]:
        """Ids of the members of ``archive`` (``"<archive>::<member>"``) done for ``model``.

        Two index range scans: TEXT ids, then raw-byte (BLOB) ids, since SQLite orders every TEXT
        before every BLOB. ``"<archive>::"`` <= id < ``"<archive>:;"`` holds exactly the ids that
        start with ``"<archive>::"`` (";" follows ":")."""
        cond = "" if include_errors else " AND error IS NULL"
        sql = f"SELECT id FROM results WHERE id >= ? AND id < ? AND model=?{cond}"
        raw = archive.encode("utf-8", "surrogateescape")
        bounds = [(raw + b"::", raw + b":;")]
        if isinstance(encode_id(archive), str):
            bounds.insert(0, (archive + "::", archive + ":;"))
        return [decode_id(v) for lo, hi in bounds for (v,) in self.conn.execute(sql, (lo, hi, model))]

    def done_filter(self, model: str, *, include_errors: bool = True) -> "DoneFilter":
        return DoneFilter(self.path, model, include_errors=include_errors)

    def rows(self, model: Optional[str] = None) -> Iterator[ResultRow]:
        """All rows (of one model), ordered by model then id, streamed."""
        where, args = _where(model, None)
        cur = self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM results{where} "
                                "ORDER BY model, id", args)
        for row in cur:
            yield ResultRow(decode_id(row[0]), *row[1:])

    # ---- export --------------------------------------------------------------------------
    def export(self, path: Union[str, os.PathLike], format: Optional[str] = None,
               model: Optional[str] = None) -> int:
        """Write the results (of one model, or all) as JSONL, CSV or Parquet; returns the count.

        ``format=None`` takes it from the suffix (.jsonl/.ndjson, .csv, .parquet/.pq). Ids are
        shown with ``display_id``; scores are the stored float64s (CSV writes ``repr``, exact).
        """
        path = os.fspath(path)
        fmt = format or _SUFFIXES.get(os.path.splitext(path)[1].lower())
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"cannot tell the export format of {path!r}: give format= one of "
                             f"{EXPORT_FORMATS} or use a .jsonl, .csv or .parquet suffix")
        if model is not None and model not in self.models():
            raise ValueError(f"no results for model {model!r} in {self.path} "
                             f"(models: {self.models()})")
        rows = (_export_dict(r) for r in self.rows(model))
        return {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[fmt](path, rows)


class DoneFilter:
    """``filter(id) -> bool``: is this id already in the store for ``model``? (resume)

    One indexed SQLite lookup per call (a few microseconds) through a read-only connection that
    each process opens lazily, so memory stays constant however many ids are done, and the object
    pickles to DataLoader workers (any start method) and Ray tasks as just a path and a name.
    """

    def __init__(self, path: str, model: str, *, include_errors: bool = True):
        self.path, self.model, self.include_errors = path, model, include_errors
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1
        self._sql = ("SELECT 1 FROM results WHERE id=? AND model=?"
                     + ("" if include_errors else " AND error IS NULL") + " LIMIT 1")

    def __getstate__(self) -> dict:
        return {"path": self.path, "model": self.model, "include_errors": self.include_errors}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["model"], include_errors=state["include_errors"])

    def __call__(self, ident: str) -> bool:
        if self._pid != os.getpid():  # a connection must never cross a fork
            self._conn, self._pid = _connect(self.path, readonly=True), os.getpid()
        return self._conn.execute(self._sql, (encode_id(ident), self.model)).fetchone() is not None

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn, self._pid = None, -1


def _where(model: Optional[str], errors: Optional[bool]) -> tuple[str, tuple]:
    clauses, args = [], []
    if model is not None:
        clauses.append("model=?")
        args.append(model)
    if errors is not None:
        clauses.append("error IS NOT NULL" if errors else "error IS NULL")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def _json(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _export_dict(row: ResultRow) -> dict[str, Any]:
    rec = dict(row.__dict__)
    rec["id"] = display_id(encode_id(row.id))
    return rec


def _write_jsonl(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in rows:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_csv(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for rec in rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                        for k, v in rec.items()})
            n += 1
    return n


def _write_parquet(path: str, rows: Iterable[dict], chunk: int = 65536) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("Parquet export needs pyarrow: pip install pyarrow "
                          "(or export to .jsonl / .csv)") from err
    schema = pa.schema([("id", pa.string()), ("model", pa.string()), ("hash", pa.string()),
                        ("size", pa.int64()), ("score", pa.float64()), ("label", pa.int8()),
                        ("error", pa.string()), ("time", pa.float64())])
    n, buf = 0, []
    with pq.ParquetWriter(path, schema) as writer:  # streamed: millions of rows in bounded memory
        def flush() -> None:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
            buf.clear()
        for rec in rows:
            buf.append(rec)
            n += 1
            if len(buf) >= chunk:
                flush()
        if buf or n == 0:
            flush()
    return n
