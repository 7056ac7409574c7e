"""Writing a results store's rows to files others read: JSON Lines, CSV, Parquet (streamed, so
millions of rows export in bounded memory). :meth:`aigid.scanning.store.ResultStore.export` picks
the format and the rows; this module only writes them."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Optional

COLUMNS = ("id", "model", "hash", "size", "score", "label", "error", "time", "evidence")  # export


EXPORT_FORMATS = ("jsonl", "csv", "parquet")


_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
             ".pq": "parquet"}


def evidence_object(rec: dict[str, Any]) -> dict[str, Any]:
    """JSONL shows evidence as the object it is (stored text that is not JSON stays text)."""
    if rec.get("evidence"):
        try:
            rec["evidence"] = json.loads(rec["evidence"])
        except ValueError:
            pass
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
                        ("error", pa.string()), ("time", pa.float64()),
                        ("evidence", pa.string())])
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



def format_of(path: str) -> Optional[str]:
    """The export format a file name's suffix names, or None."""
    return _SUFFIXES.get(os.path.splitext(path)[1].lower())


def write_rows(path: str, fmt: str, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` (dicts keyed by :data:`COLUMNS`) to ``path`` as ``fmt``; the count written."""
    return {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[fmt](path, rows)
