"""Realtime work admitted and not yet answered, per model: the backpressure ledger in Redis.

Each admitted call is recorded with its cost and deadline, and a running total is kept, by Lua
scripts shared by every API process (the API admits, api/admission.py says how much may be
pending). The worker that answers a call releases it in the same round trip as its answer, and
a worker asks whether a call's caller still waits before scoring it: work whose caller gave up
(timeout, or a 503 while the worker looked dead) is dropped, not computed. Entries also leave by
themselves when their deadline passes (an API process that died), so the total cannot drift.
Admitting is idempotent (a call already recorded is not counted again): redis-py sends a script
again when its connection broke before the answer, as it does while Sentinel promotes a replica.
"""

from __future__ import annotations

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
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {1, total} end
local cost = tonumber(ARGV[2])
if total > 0 and total + cost > tonumber(ARGV[5]) then return {0, total} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cost)
redis.call('INCRBY', KEYS[3], cost)
if KEYS[4] then  -- the direct path: the admitted call goes on the workers' list in the same step
  redis.call('LPUSH', KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[7])
end
return {1, total + cost}
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


@dataclass
class Verdict:
    admitted: bool
    pending: int  # cost pending for the model (including this call when admitted)


class PendingWork:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)

    def admit(self, model: str, call_id: str, cost: int, deadline: float, now: float, limit: float,
              push: tuple[str, str, int] | None = None) -> Verdict:
        """Record the call if `limit` allows it. `push` (list, message, seconds): once admitted,
        the message is LPUSHed onto the list, whose expiry is set to the seconds, in the same
        script (the direct path, api/dispatch.py): admitted and queued are one step, one round trip."""
        limit_arg = str(int(min(limit, 10**15)))  # Lua numbers: no infinity
        keys, args = list(names.pending_keys(model)), [call_id, cost, deadline, now, limit_arg]
        if push is not None:
            keys.append(push[0])
            args += [push[1], push[2]]
        ok, pending = self._admit(keys=keys, args=args)
        return Verdict(bool(ok), int(pending))

    def release(self, model: str, call_id: str, pipe: redis.client.Pipeline | None = None) -> None:
        """The call is over (answered, failed, or its caller gave up); `pipe`: as part of it.

        In a pipeline the script goes as a bare EVALSHA: redis-py's Script would make the pipeline
        ask SCRIPT EXISTS, a round trip of its own, on every execute (redis/redis-py#1470, closed
        unfixed). Should Redis have lost its script cache (a restart, a failover), that EVALSHA
        fails alone with NoScriptError, after the pipeline's other commands ran: the caller then
        releases the call again without a pipeline, which loads the script (worker/realtime.py)."""
        keys = names.pending_keys(model)
        if pipe is None:
            self._release(keys=keys, args=[call_id])
        else:
            pipe.evalsha(self._release.sha, len(keys), *keys, call_id)

    def waiting(self, model: str, call_id: str) -> bool:
        """Whether the call's caller still waits (a worker asks before scoring it)."""
        return bool(self._redis.hexists(names.pending_keys(model).costs, call_id))
