"""A job's results as a stream: JSON Lines as stored, or Parquet built piece by piece.

Results are read piece by piece from storage and sent as they are read, so a download of any size
holds one piece in memory. A piece that failed for good has no result file and is left out (the
job's status says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from shared.storage import JobStorage

PARQUET = "application/vnd.apache.parquet"


def _piece(storage: JobStorage, job_id: str, piece: int) -> bytes | None:
    try:
        return storage.read_bytes(storage.result_path(job_id, piece))
    except FileNotFoundError:
        return None


def _from(data: bytes, start: int) -> bytes:
    """The lines of a piece whose item index is `start` or more."""
    kept = [line for line in data.splitlines(keepends=True) if line.strip() and json.loads(line)["index"] >= start]
    return b"".join(kept)


def jsonl(storage: JobStorage, job_id: str, pieces: list[int], start: int = 0) -> Iterator[bytes]:
    for n, piece in enumerate(pieces):
        data = _piece(storage, job_id, piece)
        if data is None:
            continue
        yield _from(data, start) if start and n == 0 else data


def pyarrow_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _schema():
    import pyarrow as pa

    result = pa.struct([
        ("index", pa.int64()), ("relevance_score", pa.float64()),
        ("document", pa.struct([("text", pa.string())])), ("chunks", pa.int64()),
    ])
    return pa.schema([
        ("id", pa.string()), ("index", pa.int64()), ("results", pa.list_(result)),
        ("input_tokens", pa.int64()), ("error", pa.string()),
    ])


def _row(line: dict[str, Any]) -> dict[str, Any]:
    tokens = (line.get("meta") or {}).get("tokens") or {}
    return {
        "id": None if line.get("id") is None else str(line["id"]),
        "index": line["index"],
        "results": line.get("results") or [],
        "input_tokens": tokens.get("input_tokens"),
        "error": line.get("error"),
    }


class _Sink:
    """A write-only file that hands out what was written since it was last asked."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0
        self.closed = False

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def parquet(storage: JobStorage, job_id: str, pieces: list[int], start: int = 0) -> Iterator[bytes]:
    """One Parquet file, a row group per piece: `id` (text), `index`, `results` (list of
    {index, relevance_score, document {text}, chunks}), `input_tokens`, `error`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    sink = _Sink()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema)
    for n, piece in enumerate(pieces):
        data = _piece(storage, job_id, piece)
        if data is None:
            continue
        rows = [_row(json.loads(line)) for line in data.splitlines() if line.strip()]
        rows = [r for r in rows if r["index"] >= start] if start and n == 0 else rows
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            yield sink.take()
    writer.close()
    yield sink.take()
