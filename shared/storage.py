"""Where bulk job inputs and results live: a local folder by default, any fsspec URL otherwise.

Redis only ever holds job state and counters; the payload is here, where every worker and the
API can reach it (one machine: a folder; several: s3://, gs://, … with the matching fsspec
package installed). Files are written to a temporary name and renamed, so a reader never sees a
half-written piece and a piece done twice leaves exactly one result.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec


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
        with self.fs.open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def delete_job(self, job_id: str) -> None:
        if self.fs.exists(self.job_dir(job_id)):
            self.fs.rm(self.job_dir(job_id), recursive=True)

    def modified(self, path: str) -> float | None:
        """When a folder or file last changed (Unix time), where the filesystem says."""
        try:
            value = self.fs.modified(path)
        except (NotImplementedError, OSError, ValueError):
            return None
        return value.timestamp() if value else None

    def job_ids(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
