"""Bulk job state in Redis: a hash of counters and times per job, and the set of finished pieces.

Every change is one Lua script, so counters move exactly once per piece even when a piece is
done twice (a worker killed after writing its result, the piece handed out again): the piece
number enters the set once, and only that first entry counts.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import names

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = {SUCCEEDED, FAILED, CANCELLED}

_START = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
return 1
"""

_COMPLETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'items_done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'pairs_done', ARGV[3])
local errors = tonumber(ARGV[4])
if errors > 0 then
  redis.call('HINCRBY', KEYS[1], 'errors', errors)
  redis.call('HSET', KEYS[1], 'last_error', ARGV[5])
end
local done = redis.call('HINCRBY', KEYS[1], 'pieces_done', 1)
if done >= tonumber(redis.call('HGET', KEYS[1], 'pieces_total')) then
  local status = redis.call('HGET', KEYS[1], 'status')
  if status ~= 'cancelled' then
    if tonumber(redis.call('HGET', KEYS[1], 'errors') or '0') > 0 then status = 'failed' else status = 'succeeded' end
    redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[6])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
return 1
"""

_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 'cancelled'
end
return status
"""

_INTS = ("items_total", "pairs_total", "pieces_total", "items_done", "pairs_done", "pieces_done", "errors")
_FLOATS = ("created_at", "started_at", "finished_at")
_BOOLS = ("return_documents", "raw_scores", "return_chunks")


def new_job_id() -> str:
    """128 random bits: a job id cannot be guessed."""
    return "job_" + secrets.token_hex(16)


def owner_of(token: str | None) -> str:
    """What is stored of the token that created a job: a digest, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


@dataclass
class Job:
    id: str
    model: str
    status: str
    owner: str
    items_total: int
    pairs_total: int
    pieces_total: int
    items_done: int = 0
    pairs_done: int = 0
    pieces_done: int = 0
    errors: int = 0
    last_error: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    return_documents: bool = False
    raw_scores: bool = False
    return_chunks: bool = False
    options: str = "{}"  # ScoreOptions as JSON: how long documents are handled

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> Job:
        data: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for key in _INTS:
            data[key] = int(data.get(key, 0))
        for key in _FLOATS:
            data[key] = float(data[key]) if data.get(key) else None
        for key in _BOOLS:
            data[key] = data.get(key) == "1"
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def pairs_per_second(self) -> float | None:
        if not self.started_at or not self.pairs_done:
            return None
        end = self.finished_at or time.time()
        return round(self.pairs_done / max(end - self.started_at, 1e-6), 2)


class JobStore:
    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        self._start = client.register_script(_START)
        self._complete = client.register_script(_COMPLETE)
        self._cancel = client.register_script(_CANCEL)

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        return [names.job_key(job_id), names.job_pieces_key(job_id)]

    def create(self, job: Job) -> None:
        fields = {
            "id": job.id, "model": job.model, "status": QUEUED, "owner": job.owner,
            "items_total": job.items_total, "pairs_total": job.pairs_total,
            "pieces_total": job.pieces_total, "items_done": 0, "pairs_done": 0, "pieces_done": 0,
            "errors": 0, "created_at": job.created_at or time.time(),
            "return_documents": int(job.return_documents), "raw_scores": int(job.raw_scores),
            "return_chunks": int(job.return_chunks), "options": job.options,
        }
        self._redis.hset(names.job_key(job.id), mapping=fields)

    def get(self, job_id: str) -> Job | None:
        raw = self._redis.hgetall(names.job_key(job_id))
        return Job.from_redis(raw) if raw else None

    def piece_done(self, job_id: str, piece: int) -> bool:
        return bool(self._redis.sismember(names.job_pieces_key(job_id), piece))

    def done_pieces(self, job_id: str) -> set[int]:
        return {int(p) for p in self._redis.smembers(names.job_pieces_key(job_id))}

    def mark_started(self, job_id: str) -> bool:
        return bool(self._start(keys=self._keys(job_id), args=[time.time()]))

    def complete_piece(self, job_id: str, piece: int, items: int, pairs: int, errors: int = 0,
                       last_error: str = "") -> bool:
        """Count a finished piece; False when it was already counted (or the job is gone)."""
        result = self._complete(
            keys=self._keys(job_id),
            args=[piece, items, pairs, errors, last_error[:500], time.time(), self._ttl],
        )
        return result == 1

    def cancel(self, job_id: str) -> str | None:
        """The job's status after the call; None for an unknown job."""
        result = self._cancel(keys=self._keys(job_id), args=[time.time(), self._ttl])
        return result.decode() if result else None
