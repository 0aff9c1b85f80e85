"""The messages of a dead worker go back to their queue within a minute, not after 15.

kombu's Redis transport keeps every delivered, unacknowledged message in its `unacked` hash (by
delivery tag) and hands it out again only when VISIBILITY_TIMEOUT (900 s) has passed since the
delivery: it cannot tell a worker that died from one still working on a long task. Our workers
heartbeat, so we can:

- each worker lists the delivery tags of the bulk pieces it holds (`rerank:held:<worker id>`,
  added when Celery receives one; a realtime call's caller has had its 503 long before) and, with every heartbeat, stamps itself in `rerank:holders` with Redis's own
  clock and drops from its list the tags that are no longer unacknowledged;
- a worker whose stamp is older than REDELIVER_AFTER seconds is dead. Any live worker's heartbeat
  claims the lists of dead workers (one Lua script: a list is claimed once, whoever asks) and
  hands each message back with kombu's own restore, a WATCH transaction on the `unacked` hash: a
  message acknowledged meanwhile is not restored, and none is restored twice.

- a worker taking synchronous calls from the direct path's list (worker/realtime_consumer.py)
  keeps each call it is scoring on its own held list: the same claim puts a dead worker's calls
  back where live workers take them. A call its caller has given up on is dropped unscored
  (worker/realtime.py asks the pending ledger), so redelivery helps exactly the callers still
  waiting (REDELIVER_AFTER < SYNC_TIMEOUT), and a call answered twice is read once.

A bulk piece done twice counts once (shared/jobs.py). Should a reaper die between its claim and
the restores, the messages are still in `unacked` and VISIBILITY_TIMEOUT hands them out as before.
"""

from __future__ import annotations

import logging

import redis
from celery import Celery

from shared import names

log = logging.getLogger(__name__)

_HEARTBEAT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], now[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[4], ARGV[1], ARGV[2]) end
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HEXISTS', KEYS[3], tag) == 0 then redis.call('SREM', KEYS[2], tag) end
end
return redis.call('SCARD', KEYS[2])
"""

_CLAIM = """
local now = tonumber(redis.call('TIME')[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 20)
local tags = {}
local calls = 0
for _, id in ipairs(dead) do
  local key = ARGV[2] .. id
  for _, tag in ipairs(redis.call('SMEMBERS', key)) do tags[#tags + 1] = tag end
  redis.call('DEL', key)
  local list = redis.call('HGET', KEYS[2], id)
  if list then
    -- the direct path's calls it was scoring go back to the end its list is taken from, oldest first
    while redis.call('LMOVE', ARGV[3] .. id, list, 'LEFT', 'RIGHT') do calls = calls + 1 end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('DEL', ARGV[3] .. id)
  redis.call('ZREM', KEYS[1], id)
end
return {dead, tags, calls}
"""


class Redelivery:
    def __init__(self, client: redis.Redis, worker_id: str, redeliver_after: float) -> None:
        self._redis = client
        self.worker_id = worker_id
        self.redeliver_after = redeliver_after
        self.realtime_list = ""  # where the direct path's calls it holds go back (takes_realtime)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._claim = client.register_script(_CLAIM)

    def hold(self, delivery_tag: str) -> None:
        """A message was delivered to this worker (kombu has recorded it as unacknowledged)."""
        self._redis.sadd(names.held_key(self.worker_id), delivery_tag)

    def heartbeat(self) -> int:
        """Stamp this worker alive; forget the tags it no longer holds. Returns how many it holds."""
        return int(self._heartbeat(
            keys=[names.holders_key(), names.held_key(self.worker_id), names.KOMBU_UNACKED, names.realtime_lists_key()],
            args=[self.worker_id, self.realtime_list],
        ))

    def takes_realtime(self, realtime_list: str) -> None:
        """This worker takes direct-path calls from `realtime_list`: should it die, the calls it
        holds (names.realtime_held_key) go back there. Recorded with every heartbeat, so a Redis
        that restarted empty learns it again; and at once, before the first call is taken."""
        self.realtime_list = realtime_list
        self.heartbeat()

    def claim_dead(self) -> tuple[list[str], list[str], int]:
        """(dead worker ids, the delivery tags they held, how many direct-path calls they held),
        each claimed by this call only; the calls are back on their list when it returns."""
        dead, tags, calls = self._claim(keys=[names.holders_key(), names.realtime_lists_key()],
                                        args=[self.redeliver_after, names.held_key(""), names.realtime_held_key("")])
        return [d.decode() for d in dead], [t.decode() for t in tags], int(calls)

    def reap(self, app: Celery) -> int:
        """Hand the messages of dead workers back to their queues; returns how many were claimed."""
        dead, tags, calls = self.claim_dead()
        if not dead:
            return 0
        if calls:
            log.warning("worker(s) %s silent for %gs: %d synchronous call(s) they held handed out again",
                        ", ".join(dead), self.redeliver_after, calls)
        if tags:
            with app.connection_for_write() as conn:
                qos = conn.default_channel.qos  # kombu's Redis QoS: restore_by_tag is its own code
                for tag in tags:
                    qos.restore_by_tag(tag)
        if tags or not calls:
            log.warning("worker(s) %s silent for %gs: %d unacknowledged message(s) handed out again",
                        ", ".join(dead), self.redeliver_after, len(tags))
        return len(tags) + calls
