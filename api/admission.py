"""Backpressure: a bound on the realtime work pending per model, shared by every API process.

Each admitted call is recorded in Redis with its pair count and deadline; a call that would push
the total past the limit is refused at once (429 + Retry-After) instead of waiting in a queue it
cannot get out of before its timeout. Entries leave when the call ends, or by themselves when their
deadline passes (an API process that died), so the count cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from shared import names

_ADMIT = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'LIMIT', 0, 500)
if #expired > 0 then
  local sizes = redis.call('HMGET', KEYS[2], unpack(expired))
  local freed = 0
  for _, v in ipairs(sizes) do if v then freed = freed + tonumber(v) end end
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('DECRBY', KEYS[3], freed)
end
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
if total < 0 then total = 0 redis.call('SET', KEYS[3], 0) end
local pairs = tonumber(ARGV[2])
if total > 0 and total + pairs > tonumber(ARGV[5]) then return {0, total} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], pairs)
redis.call('INCRBY', KEYS[3], pairs)
return {1, total + pairs}
"""

_RELEASE = """
local v = redis.call('HGET', KEYS[2], ARGV[1])
if v then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DECRBY', KEYS[3], v)
end
return v
"""

#: Share of the workers' measured capacity over SYNC_TIMEOUT that may be pending at once.
CAPACITY_SHARE = 0.75


@dataclass
class Verdict:
    admitted: bool
    pending: int  # pairs pending for the model (including this call when admitted)


class Admission:
    def __init__(self, client: redis.Redis) -> None:
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)

    def admit(self, model: str, call_id: str, pairs: int, deadline: float, now: float, limit: float) -> Verdict:
        limit_arg = str(int(min(limit, 10**15)))  # Lua numbers: no infinity
        ok, pending = self._admit(keys=names.pending_keys(model), args=[call_id, pairs, deadline, now, limit_arg])
        return Verdict(bool(ok), int(pending))

    def release(self, model: str, call_id: str) -> None:
        self._release(keys=names.pending_keys(model), args=[call_id])


def pending_limit(explicit: int | None, workers: list[dict], sync_timeout: float) -> float:
    """MAX_PENDING_PAIRS when set; else what the live workers can score before the timeout."""
    if explicit is not None:
        return explicit
    rate = sum(w.get("pairs_per_second") or 0.0 for w in workers)
    return rate * sync_timeout * CAPACITY_SHARE if rate > 0 else math.inf


def retry_after(pending: int, workers: list[dict]) -> int:
    """Seconds until the pending work should be done, at the workers' measured pace."""
    rate = sum(w.get("pairs_per_second") or 0.0 for w in workers)
    return max(1, math.ceil(pending / rate)) if rate > 0 else 1
