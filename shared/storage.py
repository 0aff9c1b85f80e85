"""Where bulk job inputs and results live: a local folder by default, any fsspec URL otherwise.

Redis only ever holds job state and counters; the payload is here, where every worker and the
API can reach it (one machine: a folder; several: s3://, gs://, … with the matching fsspec
package installed). Files are written to a temporary name and renamed, so a reader never sees a
half-written piece and a piece done twice leaves exactly one result.
"""

from __future__ import annotations

import functools
import json
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem

T = TypeVar("T")


def _gevent_hub():
    """gevent's hub when this process runs under gevent's monkey patching (the API), else None.
    Looked up in sys.modules: a process that never imported gevent (a worker) has nothing to do."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    return sys.modules["gevent"].get_hub()


def off_the_event_loop(fs: fsspec.AbstractFileSystem, call: Callable[..., T], *args: Any) -> T:
    """Work-around for fsspec/filesystem_spec#1701: fsspec's asynchronous filesystems (s3fs, gcsfs,
    http) run their I/O on fsspec's event loop and refuse ("Calling sync() from within a running
    loop") when gevent's monkey patching has put that loop's thread and the caller on one OS
    thread, as in the API's gevent worker (api/http_worker.py). There such calls run on gevent's
    pool of real threads; anywhere else (the workers, local folders) they run directly."""
    hub = _gevent_hub() if isinstance(fs, AsyncFileSystem) else None
    if hub is not None:
        return hub.threadpool.apply(call, args)
    return call(*args)


class OffLoopFile:
    """A file of an asynchronous filesystem whose reads run off gevent's loop (see above)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, file: Any) -> None:
        self._fs, self._file = fs, file

    def read(self, size: int = -1) -> bytes:
        return off_the_event_loop(self._fs, self._file.read, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return off_the_event_loop(self._fs, self._file.seek, offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        off_the_event_loop(self._fs, self._file.close)

    def __getattr__(self, name: str) -> Any:  # closed, seekable, readable, size, …
        return getattr(self._file, name)


def open_for_reading(url: str, **options: Any) -> IO[bytes]:
    """Open any fsspec URL for reading, usable from the API's gevent worker as from anywhere."""
    opened = fsspec.open(url, "rb", **options)
    file = off_the_event_loop(opened.fs, opened.open)
    return OffLoopFile(opened.fs, file) if isinstance(opened.fs, AsyncFileSystem) else file  # type: ignore[return-value]


def _off_loop(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def call(self: JobStorage, *args: Any) -> T:
        return off_the_event_loop(self.fs, method, self, *args)

    return call


class JobStorage:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    # --- layout -------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        return f"{self.root}/{job_id}"

    def input_path(self, job_id: str, piece: int) -> str:
        return f"{self.root}/{job_id}/input/{piece:07d}.jsonl"

    def result_path(self, job_id: str, piece: int) -> str:
        return f"{self.root}/{job_id}/results/{piece:07d}.jsonl"

    def marker_path(self, job_id: str) -> str:
        """Written first, before any piece: when the job's folder was started (the sweep reads it)."""
        return f"{self.root}/{job_id}/job.json"

    def index_path(self, job_id: str) -> str:
        """Written last: the index of each piece's first item (results from an index on)."""
        return f"{self.root}/{job_id}/pieces.json"

    # --- files --------------------------------------------------------------------------------
    def write_lines(self, path: str, records: Iterable[dict[str, Any]]) -> None:
        """JSON Lines, written under a temporary name and renamed into place."""
        data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
        self.write_bytes(path, data.encode())

    @_off_loop
    def write_bytes(self, path: str, data: bytes) -> None:
        """Written under a temporary name and renamed into place: never seen half-written."""
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def read_lines(self, path: str) -> Iterator[dict[str, Any]]:
        for line in self.read_bytes(path).splitlines():
            if line.strip():
                yield json.loads(line)

    @_off_loop
    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    @_off_loop
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    @_off_loop
    def delete_job(self, job_id: str) -> None:
        if self.fs.exists(self.job_dir(job_id)):
            self.fs.rm(self.job_dir(job_id), recursive=True)

    @_off_loop
    def modified(self, path: str) -> float | None:
        """When a folder or file last changed (Unix time), where the filesystem says."""
        try:
            value = self.fs.modified(path)
        except (NotImplementedError, OSError, ValueError):
            return None
        return value.timestamp() if value else None

    @_off_loop
    def job_ids(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
