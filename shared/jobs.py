"""Bulk job state in Redis: a hash of counters and times per job, and the set of finished pieces.

Every change is one Lua script, so counters move exactly once per piece even when a piece is
done twice (a worker killed after writing its result, the piece handed out again): the piece
number enters the set once, and only that first entry counts.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import names

RECEIVING, QUEUED, RUNNING = "receiving", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINISHED = {SUCCEEDED, FAILED, CANCELLED}
IN_FLIGHT = {RECEIVING, QUEUED, RUNNING}

#: A job being uploaded holds its state this long past the last sign of the upload moving.
RECEIVING_TTL_SECONDS = 300

# Admission of a new job, atomic across API processes: count the owner's jobs in flight and the
# input bytes its kept jobs hold (forgetting expired ones), refuse past a limit, else create the
# job's state as `receiving` before a byte of it is stored: the storage sweep spares any folder
# whose job has state, so an upload in progress is never taken for an abandoned one.
_RESERVE = """
local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local active, bytes = 0, 0
for i = 1, #members, 2 do
  local status = redis.call('HGET', ARGV[9] .. members[i], 'status')
  if not status then
    redis.call('ZREM', KEYS[2], members[i])
  else
    bytes = bytes + tonumber(members[i + 1])
    if status == 'receiving' or status == 'queued' or status == 'running' then active = active + 1 end
  end
end
if active >= tonumber(ARGV[5]) then return {'jobs', active, bytes} end
if tonumber(ARGV[6]) > 0 and bytes >= tonumber(ARGV[6]) then return {'bytes', active, bytes} end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'owner', ARGV[2], 'model', ARGV[3], 'status', 'receiving',
           'created_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return {'ok', active, bytes}
"""

# The upload is complete: the job becomes `queued` with all its fields, keeps its state until it
# ends, and joins its owner's line for fair turns (shared/feed.py), the owner the rotation.
_ACCEPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'receiving' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
local turn = redis.call('GET', KEYS[5]) or '0'
redis.call('ZADD', KEYS[4], 'NX', turn, ARGV[3])
return 1
"""

_START = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
return 1
"""

# A piece ended: its results are written (ARGV[8] = 0) or it failed for good (1: no results).
# After a cancel, pieces that were already running may still end: they count, and the job's
# finished_at moves to the last of them, so pairs_per_second stays true.
_COMPLETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'items_done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'pairs_done', ARGV[3])
local errors = tonumber(ARGV[4])
if errors > 0 then redis.call('HINCRBY', KEYS[1], 'errors', errors) end
if tonumber(ARGV[8]) > 0 then redis.call('HINCRBY', KEYS[1], 'pieces_failed', 1) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[5]) end
local done = redis.call('HINCRBY', KEYS[1], 'pieces_done', 1)
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'cancelled' then
  if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], 'finished_at', ARGV[6]) end
elseif done >= tonumber(redis.call('HGET', KEYS[1], 'pieces_total')) then
  local failed = tonumber(redis.call('HGET', KEYS[1], 'errors') or '0') > 0
    or tonumber(redis.call('HGET', KEYS[1], 'pieces_failed') or '0') > 0
  if failed then status = 'failed' else status = 'succeeded' end
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[6])
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

_INTS = ("items_total", "pairs_total", "pieces_total", "items_done", "pairs_done", "pieces_done", "errors",
         "pieces_failed", "pieces_fed", "input_bytes")
_FLOATS = ("created_at", "started_at", "finished_at")
#: Options a job's hash held as fields of their own before its ScoreOptions held them all.
_LEGACY_OPTIONS = ("return_documents", "raw_scores", "return_chunks")


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
    pieces_failed: int = 0
    pieces_fed: int = 0
    input_bytes: int = 0
    errors: int = 0
    last_error: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    options: str = "{}"  # its ScoreOptions as JSON (shared/schemas.py): how it is scored and answered
    traceparent: str = ""  # W3C traceparent of the creating call (its pieces' spans link to it), or ''

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> Job:
        data: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for key in _INTS:
            data[key] = int(data.get(key, 0))
        for key in _FLOATS:
            data[key] = float(data[key]) if data.get(key) else None
        legacy = {key: data.pop(key) == "1" for key in _LEGACY_OPTIONS if key in data}
        if legacy:  # stored before these moved into `options` (a job queued across an upgrade)
            data["options"] = json.dumps({**json.loads(data.get("options") or "{}"), **legacy})
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def pairs_per_second(self) -> float | None:
        """Pairs scored per second from the first piece's start to the last counted piece's end
        (after a cancel too: finished_at follows the pieces that were still running)."""
        if not self.started_at or not self.pairs_done:
            return None
        end = self.finished_at or time.time()
        return round(self.pairs_done / max(end - self.started_at, 1e-6), 2)


@dataclass
class Refusal:
    """Why a token may not start another job now: which limit, and where it stands."""

    limit: str  # "jobs" or "bytes"
    jobs_in_flight: int
    bytes_stored: int


class JobStore:
    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        self._reserve = client.register_script(_RESERVE)
        self._accept = client.register_script(_ACCEPT)
        self._start = client.register_script(_START)
        self._complete = client.register_script(_COMPLETE)
        self._cancel = client.register_script(_CANCEL)

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        return [names.job_key(job_id), names.job_pieces_key(job_id)]

    # --- API side: admission and intake ------------------------------------------------------------
    def reserve(self, job_id: str, *, owner: str, model: str, max_jobs: int, max_bytes: int) -> Refusal | None:
        """Create the job's state as `receiving` unless the owner is at a limit (then why)."""
        verdict, active, stored = self._reserve(
            keys=[names.job_key(job_id), names.owner_jobs_key(owner)],
            args=[job_id, owner, model, time.time(), max_jobs, max_bytes, RECEIVING_TTL_SECONDS,
                  self._ttl + RECEIVING_TTL_SECONDS, names.job_key("")],
        )
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        return None if verdict == "ok" else Refusal(verdict, int(active), int(stored))

    def receiving(self, job_id: str, owner: str, input_bytes: int) -> bool:
        """The upload moves on: keep its state alive and count its bytes; False if it was lost."""
        pipe = self._redis.pipeline()
        pipe.expire(names.job_key(job_id), RECEIVING_TTL_SECONDS)
        pipe.zadd(names.owner_jobs_key(owner), {job_id: input_bytes}, xx=True)
        return bool(pipe.execute()[0])

    def accept(self, job: Job, replicas: int = 0, wait_seconds: float = 2.0) -> tuple[bool, int]:
        """The whole input is stored: the job is queued and joins the fair turns. Returns whether it
        was (False when its `receiving` state was lost meanwhile: it expired, or Redis lost it) and
        how many replicas confirmed holding it: with `replicas` > 0 the script and a `WAIT` go on one
        connection (WAIT counts that connection's writes), so a promoted replica has the job."""
        fields = {
            "status": QUEUED, "items_total": job.items_total, "pairs_total": job.pairs_total,
            "pieces_total": job.pieces_total, "items_done": 0, "pairs_done": 0, "pieces_done": 0,
            "pieces_failed": 0, "pieces_fed": 0, "errors": 0, "input_bytes": job.input_bytes,
            "options": job.options, "traceparent": job.traceparent,
        }
        flat = [str(v) for pair in fields.items() for v in pair]
        feed = names.feed_keys(job.model)
        keys = [names.job_key(job.id), names.owner_jobs_key(job.owner),
                names.feed_owner_key(job.model, job.owner), feed.owners, feed.turn]
        args = [job.input_bytes, job.id, job.owner, job.created_at, *flat]
        if replicas <= 0:
            return bool(self._accept(keys=keys, args=args)), 0
        pipe = self._redis.pipeline(transaction=False)
        self._accept(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", replicas, int(wait_seconds * 1000))
        accepted, acknowledged = pipe.execute()
        return bool(accepted), int(acknowledged)

    def forget(self, job_id: str, owner: str) -> None:
        """Drop the state of a job that was refused or removed."""
        pipe = self._redis.pipeline()
        pipe.delete(names.job_key(job_id), names.job_pieces_key(job_id))
        pipe.zrem(names.owner_jobs_key(owner), job_id)
        pipe.execute()

    def create(self, job: Job) -> None:
        """Write a job's state in one go (tests and tools; the API goes through reserve/accept)."""
        fields = {
            "id": job.id, "model": job.model, "status": QUEUED, "owner": job.owner,
            "items_total": job.items_total, "pairs_total": job.pairs_total,
            "pieces_total": job.pieces_total, "items_done": 0, "pairs_done": 0, "pieces_done": 0,
            "errors": 0, "created_at": job.created_at or time.time(),
            "options": job.options,
        }
        self._redis.hset(names.job_key(job.id), mapping=fields)

    # --- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        raw = self._redis.hgetall(names.job_key(job_id))
        return Job.from_redis(raw) if raw and b"pieces_total" in raw else None

    def is_cancelled(self, job_id: str) -> bool:
        """Whether a piece of this job should stop now: cancelled, or gone (expired, deleted).
        One HGET: cheap enough to ask between two batches."""
        status = self._redis.hget(names.job_key(job_id), "status")
        return status is None or status == CANCELLED.encode()

    def piece_done(self, job_id: str, piece: int) -> bool:
        return bool(self._redis.sismember(names.job_pieces_key(job_id), piece))

    def done_pieces(self, job_id: str) -> set[int]:
        return {int(p) for p in self._redis.smembers(names.job_pieces_key(job_id))}

    # --- worker side ---------------------------------------------------------------------------
    def mark_started(self, job_id: str) -> bool:
        return bool(self._start(keys=self._keys(job_id), args=[time.time()]))

    def complete_piece(self, job_id: str, piece: int, items: int, pairs: int, errors: int = 0,
                       last_error: str = "") -> bool:
        """Count a finished piece; False when it was already counted (or the job is gone)."""
        result = self._complete(
            keys=self._keys(job_id),
            args=[piece, items, pairs, errors, last_error[:500], time.time(), self._ttl, 0],
        )
        return result == 1

    def fail_piece(self, job_id: str, piece: int, message: str) -> bool:
        """A piece failed for good (its retries are exhausted; e.g. its input is unreadable): count
        it as ended without results, so its job ends `failed` with the reason instead of waiting
        for it for ever. False when the piece was counted already (or the job is gone)."""
        result = self._complete(
            keys=self._keys(job_id),
            args=[piece, 0, 0, 0, f"piece {piece}: {message}"[:500], time.time(), self._ttl, 1],
        )
        return result == 1

    # --- API side: cancel ------------------------------------------------------------------------
    def cancel(self, job_id: str) -> str | None:
        """The job's status after the call; None for an unknown job."""
        result = self._cancel(keys=self._keys(job_id), args=[time.time(), self._ttl])
        return result.decode() if result else None
