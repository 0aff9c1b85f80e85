"""Fair turns for bulk work: pieces reach the broker a few at a time, owner by owner.

Sending every piece of a job to Celery at once made the bulk queue first in, first out: 200 jobs
of one token ran before a later job of another. Instead only a few pieces per model are in flight
(handed to the broker and not yet ended: `DEPTH_PER_WORKER` per live worker), and whenever one
ends the next is picked here: from the owner (the token that created the job) whose turn is the
oldest, and within an owner from its oldest job. Two tokens therefore share the workers half and
half, whatever number of jobs each queued.

One Lua script decides, so any number of API processes and workers may call `feed` at once. A
piece stays listed as in flight until a worker ends it (`piece_ended`, called after every piece
whatever its outcome). A piece is also listed as `sending` until its message is in the broker: one
still listed after `SEND_GRACE_SECONDS` was lost with its sender (killed between the script and the
broker) and is handed out again at the next call (an API calls every 5 s); one in flight for longer than two minutes (or
the workers' visibility timeout, if shorter: its message was lost on the way into a worker killed
at that moment) is handed out again too. A piece done twice still counts once
(shared/jobs.py), so handing out again is always safe.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Celery

from shared import names, tracing
from shared.schemas import PieceTask

log = logging.getLogger(__name__)

#: Pieces in flight per live worker: enough to keep a device busy while the next piece is read.
DEPTH_PER_WORKER = 4
#: In flight when no worker is alive yet (the first ones are ready when one starts).
MIN_DEPTH = 4
#: A piece handed out but not confirmed in the broker after this long was lost by its sender.
SEND_GRACE_SECONDS = 5
#: A piece in flight (queued or running: about a second of model time) for longer than the broker's
#: visibility timeout, or than this, is handed out again: a duplicate counts once.
STALE_AFTER_MAX_SECONDS = 120

# KEYS: in-flight zset, owners zset, turn counter, sending zset, the model's worker set, the
#       workers' stale-after value.
# ARGV: now, stale_after, min_depth, per_worker, job key prefix, owner line prefix, worker prefix,
#       send grace, whether the caller is a worker (its stale_after is the one that counts).
_FEED = """
local now = tonumber(ARGV[1])
if ARGV[9] == '1' then redis.call('SET', KEYS[6], ARGV[2], 'EX', 3600) end
local stale_after = tonumber(redis.call('GET', KEYS[6]) or ARGV[2])
local live = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if redis.call('EXISTS', ARGV[7] .. id) == 1 then live = live + 1 end
end
local out = {}
local listed = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #listed, 2 do
  local member = listed[i]
  local job = string.match(member, '^(.*):%d+$')
  local status = redis.call('HGET', ARGV[5] .. job, 'status')
  local sending = redis.call('ZSCORE', KEYS[4], member)
  if status ~= 'queued' and status ~= 'running' then
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[4], member)
  elseif (sending and tonumber(sending) < now - tonumber(ARGV[8]))
      or (live > 0 and tonumber(listed[i + 1]) < now - stale_after) then
    redis.call('ZADD', KEYS[1], now, member)
    redis.call('ZADD', KEYS[4], now, member)
    table.insert(out, member)
  end
end
local depth = math.max(tonumber(ARGV[3]), tonumber(ARGV[4]) * live)
local inflight = redis.call('ZCARD', KEYS[1])
while inflight < depth do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then break end
  local owner = first[1]
  local line = ARGV[6] .. owner
  local head = redis.call('ZRANGE', line, 0, 0)
  if #head == 0 then
    redis.call('ZREM', KEYS[2], owner)
  else
    local job = head[1]
    local key = ARGV[5] .. job
    local status = redis.call('HGET', key, 'status')
    local fed = tonumber(redis.call('HGET', key, 'pieces_fed') or '0')
    local total = tonumber(redis.call('HGET', key, 'pieces_total') or '0')
    if (status ~= 'queued' and status ~= 'running') or fed >= total then
      redis.call('ZREM', line, job)
    else
      redis.call('HSET', key, 'pieces_fed', fed + 1)
      if fed + 1 >= total then redis.call('ZREM', line, job) end
      redis.call('ZADD', KEYS[1], now, job .. ':' .. fed)
      redis.call('ZADD', KEYS[4], now, job .. ':' .. fed)
      table.insert(out, job .. ':' .. fed)
      inflight = inflight + 1
      redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), owner)
    end
  end
end
return out
"""


class Feeder:
    """Hands the next pieces of a model's jobs to the broker, in fair turns."""

    def __init__(self, client: redis.Redis, celery: Celery, visibility_timeout: float, *, worker: bool = False) -> None:
        self._redis = client
        self._celery = celery
        # A piece in flight longer than this was lost (a message taken by a worker killed before it
        # was recorded as unacknowledged; held ones come back by shared/redelivery.py): the
        # workers' value counts, so they publish theirs and any caller (an API too) applies it.
        self._stale_after = min(visibility_timeout, STALE_AFTER_MAX_SECONDS) + 5
        self._worker = worker
        self._script = client.register_script(_FEED)

    def feed(self, model: str) -> int:
        """Top the model's pieces in flight up to their depth; returns how many were sent."""
        pieces = self._script(
            keys=[*names.feed_keys(model), names.workers_key(model), names.feed_stale_after_key(model)],
            args=[time.time(), self._stale_after, MIN_DEPTH, DEPTH_PER_WORKER, names.job_key(""),
                  names.feed_owner_key(model, ""), names.worker_key(""), SEND_GRACE_SECONDS,
                  "1" if self._worker else "0"],
        )
        if not pieces:
            return 0
        # Each piece is a trace of its own (linked to its job's creating call: worker/jobs.py), not
        # a child of the call or the piece that happened to hand it out.
        with tracing.detached(), self._celery.producer_or_acquire() as producer:
            for member in pieces:
                job_id, _, piece = member.decode().rpartition(":")
                self._celery.send_task(
                    names.BULK_TASK,
                    args=[PieceTask(job_id=job_id, piece=int(piece)).model_dump()],
                    queue=names.bulk_queue(model),
                    producer=producer,
                    argsrepr=member.decode(),
                    kwargsrepr="{}",
                )
        self._redis.zrem(names.feed_keys(model).sending, *pieces)  # in the broker now
        return len(pieces)

    def piece_ended(self, model: str, job_id: str, piece: int) -> None:
        """A worker is done with a piece (scored, skipped or failed): free its turn, feed on.
        Worker side: called after every piece, whatever its outcome (worker/jobs.py)."""
        keys = names.feed_keys(model)
        pipe = self._redis.pipeline()
        pipe.zrem(keys.inflight, f"{job_id}:{piece}")
        pipe.zrem(keys.sending, f"{job_id}:{piece}")
        pipe.execute()
        self.feed(model)
