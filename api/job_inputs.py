"""Where a job's input comes from: the request body, or a URL the job names (`input_url`).

A URL is read only when it lies under a prefix the operator listed in `JOB_INPUT_PREFIXES`; with
none listed (the default) every `input_url` is refused, so a client can never make the server read
its own files. The check is made on the location fsspec would really open: a local path (plain or
`file://`) is resolved with its symlinks and `..` first, a remote key may hold no `.` or `..`
segment (in plain or percent-encoded form), fsspec's `a::b` chaining is refused, and a prefix
matches whole path segments only (`s3://b/in` does not allow `s3://b/internal`).

Body readers count what they read: a body that ends before its Content-Length (the client
half-closed or went away) is refused instead of becoming a smaller job.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import unquote

import fsspec
from fsspec.core import split_protocol

from pydantic import ValidationError

from api.errors import ApiError
from shared.schemas import JobItem
from shared.storage import open_for_reading

#: Read size for request bodies and input files: large reads keep intake at disk/network speed.
BLOCK_BYTES = 1 << 20

PARQUET_COLUMNS = ("id", "query", "documents", "top_n")
PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet", "application/parquet")
_LOCAL = (None, "file", "local")


class Truncated(Exception):
    """The body ended before its Content-Length, or broke off (a chunked body cut short)."""

    def __init__(self, got: int, expected: int | None, reason: str = "") -> None:
        super().__init__(f"{got} of {expected} bytes {reason}")
        self.got, self.expected, self.reason = got, expected, reason

    @property
    def stalled(self) -> bool:
        """The client stopped sending for CLIENT_TIMEOUT seconds (api/http_worker.py)."""
        return self.reason.startswith(("TimeoutError", "timeout"))

    def message(self) -> str:
        if self.stalled:
            return f"the request body stopped arriving (CLIENT_TIMEOUT) after {self.got} bytes"
        if self.reason:
            return f"the body could not be read to its end ({self.reason}) after {self.got} bytes"
        return f"the body ended after {self.got} of the {self.expected} bytes its Content-Length announced"


class CountingReader:
    """Reads a stream in large blocks, counting bytes; a short body raises Truncated at its end."""

    def __init__(self, stream: IO[bytes], expected: int | None = None) -> None:
        self.stream = stream
        self.expected = expected
        self.bytes_read = 0

    def blocks(self) -> Iterator[bytes]:
        while True:
            try:
                block = self.stream.read(BLOCK_BYTES)
            except OSError as exc:  # the client went away, or sent a broken chunked body
                raise Truncated(self.bytes_read, self.expected, f"{type(exc).__name__}: {exc}") from None
            if not block:
                break
            self.bytes_read += len(block)
            yield block
        if self.expected is not None and self.bytes_read < self.expected:
            raise Truncated(self.bytes_read, self.expected)


#: Before refusing an upload, what is left of it is read and dropped (a lingering close, as web
#: servers do): a client that sends its whole body before reading the answer then gets the answer
#: instead of a reset connection. Bounded, so a huge refused body does not hold a thread for long.
DRAIN_BYTES, DRAIN_SECONDS = 64 << 20, 10.0


def drain(stream: IO[bytes]) -> None:
    deadline, left = time.monotonic() + DRAIN_SECONDS, DRAIN_BYTES
    try:
        while left > 0 and time.monotonic() < deadline:
            block = stream.read(min(BLOCK_BYTES, left))
            if not block:
                return
            left -= len(block)
    except Exception:  # noqa: BLE001 - the client is gone or the body is broken: nothing to drain
        return


def lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a stream of blocks (without their newline)."""
    rest = b""
    for block in blocks:
        parts = (rest + block).split(b"\n") if rest else block.split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


#: (where, item, problem): one entry of an input, validated or not.
Entry = tuple[str, "JobItem | None", "str | None"]


def _message(exc: ValidationError) -> str:
    errors = exc.errors(include_input=False, include_url=False)
    if errors[0]["type"] == "json_invalid":
        return f"not valid JSON ({errors[0].get('ctx', {}).get('error', '')})"
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in errors[:3])


def jsonl_entries(lines: Iterator[bytes]) -> Iterator[Entry]:
    """Validate JSON Lines by the JobItem model, numbered from 1; blank lines are skipped."""
    validate = JobItem.model_validate_json
    for number, line in enumerate(lines, start=1):
        if not line or line.isspace():
            continue
        try:
            yield f"line {number}", validate(line), None
        except ValidationError as exc:
            yield f"line {number}", None, _message(exc)


def parquet_entries(file: Any) -> Iterator[Entry]:
    """Validate Parquet rows (columns id, query, documents as a list of strings, optional top_n) by
    the same JobItem model, a record batch at a time; rows numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise ApiError(422, f"not a readable Parquet file: {exc}", error_type="validation") from None
    present = set(parquet.schema_arrow.names)
    missing = [c for c in ("query", "documents") if c not in present]
    if missing:
        raise ApiError(422, f"the Parquet input has no column {', '.join(missing)}; expected id, query, "
                       "documents (list of strings) and optionally top_n", error_type="validation")
    columns = [c for c in PARQUET_COLUMNS if c in present]
    validate = JobItem.model_validate
    number = 0
    for batch in parquet.iter_batches(batch_size=8192, columns=columns):
        for row in batch.to_pylist():
            number += 1
            try:
                yield f"row {number}", validate(row), None
            except ValidationError as exc:
                yield f"row {number}", None, _message(exc)


def spool(blocks: Iterator[bytes]) -> IO[bytes]:
    """A seekable copy of a body (Parquet keeps its index at the end), in an unnamed temporary
    file: nothing is left behind whatever happens."""
    file = tempfile.TemporaryFile(prefix="rerank-job-")
    try:
        for block in blocks:
            file.write(block)
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file


# --- input by URL --------------------------------------------------------------------------------


def _forbidden(url: str, why: str) -> ApiError:
    return ApiError(403, f"input_url {url!r} is not allowed: {why}", error_type="forbidden")


def _location(url: str) -> tuple[str | None, str, str]:
    """(protocol, path to compare, URL to open) as fsspec would open it: a local path absolute,
    with its symlinks and `..` resolved; a remote one with no `.`/`..` segments."""
    if "::" in url:
        raise ValueError("chained URLs (a::b) are not accepted")
    if "\x00" in url or "\\" in url:
        raise ValueError("it holds a NUL or a backslash")
    protocol, path = split_protocol(url)
    protocol = protocol.lower() if protocol else None
    if protocol in _LOCAL:
        local = os.path.realpath(fsspec.filesystem("file")._strip_protocol(url if protocol else path))
        return None, local, local
    decoded = unquote(path)
    if any(s in (".", "..") for s in decoded.split("/")):
        raise ValueError("'.' and '..' segments are not accepted in a remote URL")
    return protocol, decoded, f"{protocol}://{path}"


def check_input_url(url: str, prefixes: list[str]) -> str:
    """The URL to open if it lies under an allowed prefix; else a 403 that says why."""
    if not prefixes:
        raise _forbidden(url, "this server reads no input by URL (JOB_INPUT_PREFIXES is not set)")
    try:
        protocol, path, openable = _location(url)
    except ValueError as exc:
        raise _forbidden(url, str(exc)) from None
    for prefix in prefixes:
        try:
            allowed_protocol, allowed, _ = _location(prefix)
        except ValueError:
            continue
        allowed = allowed.rstrip("/")
        if protocol == allowed_protocol and allowed and (path == allowed or path.startswith(allowed + "/")):
            return openable
    raise _forbidden(url, "it is not under a prefix listed in JOB_INPUT_PREFIXES")


def open_input_url(url: str) -> IO[bytes]:
    """Open an allowed input for streaming (compressed files by their suffix, e.g. .gz)."""
    try:
        return open_for_reading(url, compression="infer")
    except FileNotFoundError:
        raise ApiError(422, f"input_url {url!r}: no such file", error_type="validation") from None
    except (OSError, ValueError, ImportError) as exc:
        raise ApiError(422, f"input_url {url!r} cannot be read: {type(exc).__name__}: {exc}",
                       error_type="validation") from None


def is_parquet(name: str, declared: str | None = None) -> bool:
    if declared:
        return declared == "parquet"
    return name.lower().rsplit("?", 1)[0].endswith((".parquet", ".pq"))
