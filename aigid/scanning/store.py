"""The results store of ``aigid scan``: one SQLite file, one writer, safe to kill at any moment.

Tables (schema version 2)::

    results(id, model, hash, size, score, error, time, run, evidence)   PRIMARY KEY (id, model)
    runs(run, model, detector, preprocess, threshold, version, decoder, paths, started, finished,
         summary)

Several detectors may share one file: a row is keyed by (item id, model fingerprint), and
``results.run`` names the run that scored it. ``results.evidence`` is the provenance evidence the
file declared (JSON text from ``aigid.provenance.evidence_json``; NULL when not read); exports
write it as a JSON object (JSONL), JSON text (CSV) or a string (Parquet). Labels are not stored: a reader derives
``label = score > threshold`` (fake strictly above it, as UnivFD, SIDBench and DeepfakeBench
count) with the threshold asked for (``rows(threshold=)``, ``export(threshold=)``) or, by
default, the threshold of the latest run of that model -- so a rescan with a new threshold
relabels every stored row without rescoring one.

Ownership: a file is ours when ``PRAGMA application_id`` is ``APPLICATION_ID`` and
``user_version`` is the schema version. Before anything is written, an existing file is
inspected read-only: an empty SQLite file (or none) is initialised; a file of aigid before the
marks (version 0: ``results`` with a ``label`` column) or of version 1 (no ``evidence`` column)
is migrated in one transaction (its rows kept, their evidence NULL); anything
else -- another program's SQLite file, a file that is not SQLite, a newer aigid schema -- is
refused with ``StoreError`` and left byte-identical (no tables, no WAL switch).

One writer: a writable ``ResultStore`` holds an exclusive ``flock`` on ``<file>.lock`` until it is
closed; a second writer gets ``StoreLockedError`` at once. The OS drops the lock when the
holder dies (``kill -9`` included), so a stale ``.lock`` file never blocks anyone. Readers
(``ResultStore(path, readonly=True)``, ``DoneFilter``) take no lock and never block the writer.

Durability and files: the database is in WAL mode with ``synchronous=NORMAL`` and every ``write``
is one transaction, so a killed process loses at most the batch it had not committed yet. While
a store is open for writing, these files exist beside ``results.sqlite``: ``results.sqlite-wal``
(the latest commits, not yet copied into the main file), ``results.sqlite-shm`` (the WAL index)
and ``results.sqlite.lock``. Copying a results file while a scan runs, or after a scan was
killed, needs the ``-wal`` too (or open it once with SQLite first, which folds the WAL in). At
the end of every run and on close the WAL is checkpointed and truncated, so after a finished run
the main ``.sqlite`` alone holds every row.

Ids that are not valid Unicode text (a non-UTF-8 file name, which ``os.fsdecode`` turns into lone
surrogates such as ``"caf\\udce9.jpg"``) cannot be UTF-8 encoded, so they are stored as a BLOB of
their raw bytes (``encode("utf-8", "surrogateescape")``): exact, unique and stable across runs,
and ``os.fsdecode(blob)`` gives the id back. Exports show such an id with ``backslashreplace``
(``caf\\xe9.jpg``); every other id is stored and exported unchanged.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from aigid.errors import StoreError, StoreLockedError  # noqa: F401  (re-exported)
from aigid.scanning.result_files import COLUMNS, EXPORT_FORMATS, evidence_object, format_of, write_rows
from aigid.version import __version__

__all__ = ["ResultRow", "ResultStore", "DoneFilter", "WriterLock", "StoreError",
           "StoreLockedError", "encode_id", "decode_id", "display_id", "label_of",
           "check_threshold", "EXPORT_FORMATS", "COLUMNS", "APPLICATION_ID", "SCHEMA_VERSION",
           "DEFAULT_THRESHOLD"]

log = logging.getLogger(__name__)

APPLICATION_ID = 0x61696764  # "aigd": marks a SQLite file as an aigid results store
SCHEMA_VERSION = 2
DEFAULT_THRESHOLD = 0.5  # for rows of a model that has no run recording a threshold

_RESULTS = """
CREATE TABLE {name} (
    id TEXT NOT NULL, model TEXT NOT NULL, hash TEXT, size INTEGER, score REAL, error TEXT,
    time REAL, run INTEGER REFERENCES runs (run), evidence TEXT, PRIMARY KEY (id, model)
);
"""
_RUNS = """
CREATE TABLE runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, detector TEXT, preprocess TEXT,
    threshold REAL, version TEXT, decoder TEXT, paths TEXT, started REAL, finished REAL,
    summary TEXT
);
"""
_MARK = f"PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
_CREATE = _RUNS + _RESULTS.format(name="results") + _MARK
# Version 0 (before the marks) stored a label frozen at scan time; a label is now derived on read.
_MIGRATE_V0 = (_RESULTS.format(name="results_new")
               + "INSERT INTO results_new (id, model, hash, size, score, error, time, run) "
                 "SELECT id, model, hash, size, score, error, time, NULL FROM results;"
                 "DROP TABLE results; ALTER TABLE results_new RENAME TO results;" + _MARK)
# Version 1 had no evidence column; adding one is a schema edit in SQLite (no row is rewritten).
_MIGRATE_V1 = "ALTER TABLE results ADD COLUMN evidence TEXT;" + _MARK
_V0_RESULTS = {"id", "model", "hash", "size", "score", "label", "error", "time"}
_NEW = -1  # _schema_version of an empty file: initialise it

# On conflict the newer result wins: that is how --retry-errors replaces an error row.
_UPSERT = ("INSERT INTO results (id, model, hash, size, score, error, time, run, evidence) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id, model) DO UPDATE SET "
           "hash=excluded.hash, size=excluded.size, score=excluded.score, error=excluded.error, "
           "time=excluded.time, run=excluded.run, evidence=excluded.evidence")


def label_of(score: float, threshold: float) -> int:
    """1 (fake) when ``score > threshold``: the store's one place that sets the comparison.

    The rule of ``aigid.evaluation.metrics.is_fake`` (sources cited there), kept in plain Python here because
    it runs once per exported row."""
    return int(score > threshold)


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in [0, 1] (scores are probabilities), else ``ValueError``."""
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"threshold must be a probability in [0, 1], not {threshold!r}")
    return t


@dataclass
class ResultRow:
    """One row of ``results`` (``score``/``label`` are None for an error, ``error`` for a score).

    ``label`` is derived when a row is read (``score > threshold``); ``write`` ignores it.
    ``run`` is the id of the run that scored the row (None for rows of a version-0 file).
    ``evidence``: the file's provenance evidence as JSON text (None when it was not read)."""
    id: str
    model: str
    hash: Optional[str]
    size: Optional[int]
    score: Optional[float]
    label: Optional[int]
    error: Optional[str]
    time: float
    run: Optional[int] = None
    evidence: Optional[str] = None


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


# --------------------------------------------------------------------------- the writer lock


class WriterLock:
    """An exclusive, non-blocking lock on ``<db>.lock`` for as long as a writer has the file.

    ``fcntl.flock`` belongs to the open file, so the OS drops it when the holder exits or is
    killed; the lock file is removed on release, and an acquirer that opened a file just removed
    by the previous holder notices (another inode) and takes the new one instead."""

    def __init__(self, db_path: Union[str, os.PathLike]):
        self.db_path = os.fspath(db_path)
        self.path = self.db_path + ".lock"
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriterLock":
        import fcntl  # POSIX; aigid's scanning stack (DataLoader fork, DALI) is too

        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise StoreError(f"{self.db_path}: cannot create the lock file {self.path}: "
                                 f"{err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"{self.db_path}: another scan{holder} is writing this results file "
                    f"(it holds {self.path}); wait for it to end or write to another file") from None
            except OSError:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # for the message the next one gets
                self._fd = fd
            else:  # the holder released and removed it between our open and flock: retry
                os.close(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so nobody can be holding the old inode
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


# --------------------------------------------------------------------------- opening a file


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, timeout=60,
                               check_same_thread=False)
    return sqlite3.connect(path, timeout=60, check_same_thread=False)


def _uri_path(path: str) -> str:
    from urllib.parse import quote
    return quote(os.path.abspath(path), safe="/")


def _schema_version(conn: sqlite3.Connection, path: str) -> int:
    """The aigid schema version of the open file, ``_NEW`` if it is empty, or ``StoreError``."""
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path}: not an aigid results file ({err})") from None
    if app == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path}: written by a newer aigid (results schema {version}; this "
                             f"version reads up to {SCHEMA_VERSION}): upgrade aigid")
        if version in (1, SCHEMA_VERSION):
            return version
        raise StoreError(f"{path}: unknown aigid results schema version {version}")
    if app == 0 and version == 0:
        if not tables:
            return _NEW
        if {"results", "runs"} <= tables <= {"results", "runs", "sqlite_sequence"}:
            cols = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
            if cols == _V0_RESULTS:
                return 0
    listed = ", ".join(sorted(tables)) or "none"
    raise StoreError(f"{path}: an SQLite file of another program (application id {app}, tables: "
                     f"{listed}); aigid does not write into it: give a new file name")


def _inspect(path: str) -> int:
    """``_schema_version`` of the file at ``path`` through a read-only connection (touches
    nothing); ``_NEW`` for a missing file (SQLite reads a zero-byte one as empty)."""
    if not os.path.exists(path):
        return _NEW
    if not os.path.isfile(path):
        raise StoreError(f"{path}: not a file")
    try:
        conn = _connect(path, readonly=True)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open: {err}") from None
    try:
        return _schema_version(conn, path)
    finally:
        conn.close()


class ResultStore:
    """The SQLite results file: the one writer (``readonly=False``, holds the writer lock until
    ``close``) or a reader (``readonly=True``: no lock, no writes, files of version 0 read too).

    Raises ``StoreError`` for a file that is not an aigid results file (left untouched),
    ``StoreLockedError`` while another process writes it, ``FileNotFoundError`` for a missing
    folder (or, read-only, a missing file)."""

    def __init__(self, path: Union[str, os.PathLike], *, readonly: bool = False):
        self.path = os.fspath(path)
        self.readonly = readonly
        self._lock: Optional[WriterLock] = None
        self.conn: Optional[sqlite3.Connection] = None
        self.version: Optional[int] = None
        if readonly:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"no results file {self.path}")
            self.version = _inspect(self.path)
            if self.version == _NEW:
                raise StoreError(f"{self.path}: empty, not an aigid results file yet")
            self.conn = _connect(self.path, readonly=True)
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"folder of the results file does not exist: {parent}")
        _inspect(self.path)  # refuse a foreign file before the lock file or anything else exists
        self._lock = WriterLock(self.path).acquire()
        try:
            self.conn = _connect(self.path)
            self.version = self._initialise(_schema_version(self.conn, self.path))  # under the lock
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is it on "
                                 "a network filesystem?")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            self.close()
            raise

    def _initialise(self, version: int) -> int:
        if version == SCHEMA_VERSION:
            return version
        script = {_NEW: _CREATE, 0: _MIGRATE_V0, 1: _MIGRATE_V1}[version]
        try:
            self.conn.executescript(f"BEGIN IMMEDIATE; {script} COMMIT;")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.rollback()
            raise
        if version == 0:
            log.info("%s: migrated the results file to schema %d (labels now follow the "
                     "threshold in force)", self.path, SCHEMA_VERSION)
        elif version == 1:
            log.info("%s: migrated the results file to schema %d (an evidence column; earlier "
                     "rows have none)", self.path, SCHEMA_VERSION)
        return SCHEMA_VERSION

    # ---- lifecycle -----------------------------------------------------------------------
    def checkpoint(self) -> bool:
        """Copy the WAL into the main file and truncate it; False if a reader kept part of it."""
        busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.debug("%s: a reader is open; the WAL could not be truncated yet", self.path)
        return not busy

    def close(self) -> None:
        try:
            if self.conn is not None:
                try:
                    if not self.readonly and self.version is not None:
                        self.checkpoint()
                finally:
                    self.conn.close()
        finally:
            self.conn = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------
    def write(self, rows: Iterable[ResultRow]) -> int:
        """Insert or replace ``rows`` in one transaction (all or nothing); returns the count.
        The rows' ``label`` is not stored: readers derive it from the score."""
        values = [(encode_id(r.id), r.model, r.hash, r.size, r.score, r.error, r.time, r.run,
                   r.evidence) for r in rows]
        with self.conn:  # BEGIN ... COMMIT, or ROLLBACK on any exception
            self.conn.executemany(_UPSERT, values)
        return len(values)

    def start_run(self, model: str, *, detector: Any = None, preprocess: Any = None,
                  threshold: Optional[float] = None, decoder: Optional[str] = None,
                  paths: Sequence[str] = ()) -> int:
        """Record what this run uses (detector, preprocessing, threshold, version...); its id.
        From now on its threshold is the one in force for ``model``'s labels."""
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO runs (model, detector, preprocess, threshold, version, decoder, "
                "paths, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (model, _json(detector), _json(preprocess), threshold, __version__, decoder,
                 _json([display_id(encode_id(os.fsdecode(p))) for p in paths]), time.time()))
        return int(cur.lastrowid)

    def finish_run(self, run: int, summary: dict[str, Any]) -> None:
        """Record the summary, then checkpoint: the main file alone now holds the whole run."""
        with self.conn:
            self.conn.execute("UPDATE runs SET finished=?, summary=? WHERE run=?",
                              (time.time(), _json(summary), run))
        self.checkpoint()

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

    def thresholds(self) -> dict[str, float]:
        """The threshold in force per model: that of its latest run that recorded one."""
        return dict(self.conn.execute(
            "SELECT model, threshold FROM runs WHERE threshold IS NOT NULL ORDER BY run"))

    def threshold(self, model: str) -> float:
        return self.thresholds().get(model, DEFAULT_THRESHOLD)

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

    def rows(self, model: Optional[str] = None, *,
             threshold: Optional[float] = None) -> Iterator[ResultRow]:
        """All rows (of one model), ordered by model then id, streamed; ``label`` is
        ``score > threshold``, by default with the threshold in force for each row's model."""
        in_force = self.thresholds() if threshold is None else {}
        if threshold is not None:
            threshold = check_threshold(threshold)
        # Older files, read-only: version 0 has no run column, versions 0-1 no evidence.
        run = "run" if self.version >= 1 else "NULL"
        evidence = "evidence" if self.version >= 2 else "NULL"
        where, args = _where(model, None)
        cur = self.conn.execute(f"SELECT id, model, hash, size, score, error, time, {run}, "
                                f"{evidence} FROM results{where} ORDER BY model, id", args)
        for ident, mod, digest, size, score, error, when, run_id, ev in cur:
            t = threshold if threshold is not None else in_force.get(mod, DEFAULT_THRESHOLD)
            label = None if score is None else label_of(score, t)
            yield ResultRow(decode_id(ident), mod, digest, size, score, label, error, when, run_id,
                            ev)

    # ---- export --------------------------------------------------------------------------
    def export(self, path: Union[str, os.PathLike], format: Optional[str] = None,
               model: Optional[str] = None, *, threshold: Optional[float] = None) -> int:
        """Write the results (of one model, or all) as JSONL, CSV or Parquet; returns the count.

        ``format=None`` takes it from the suffix (.jsonl/.ndjson, .csv, .parquet/.pq). Ids are
        shown with ``display_id``; scores are the stored float64s (CSV writes ``repr``, exact).
        ``evidence`` is a JSON object in JSONL, JSON text in CSV and a string in Parquet.
        ``label`` is ``score > threshold``; ``threshold=None``: each model's threshold in force
        (that of its latest run).
        """
        path = os.fspath(path)
        fmt = format or format_of(path)
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"cannot tell the export format of {path!r}: give format= one of "
                             f"{EXPORT_FORMATS} or use a .jsonl, .csv or .parquet suffix")
        if threshold is not None:
            threshold = check_threshold(threshold)
        if model is not None and model not in self.models():
            raise ValueError(f"no results for model {model!r} in {self.path} "
                             f"(models: {self.models()})")
        if threshold is None:
            log.info("%s: labels = score > the latest run's threshold per model %s", path,
                     self.thresholds())
        rows = (_export_dict(r) for r in self.rows(model, threshold=threshold))
        if fmt == "jsonl":
            rows = (evidence_object(rec) for rec in rows)
        return write_rows(path, fmt, rows)


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
    rec = {k: getattr(row, k) for k in COLUMNS}
    rec["id"] = display_id(encode_id(row.id))
    return rec
