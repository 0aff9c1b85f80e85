"""Work-around: kombu's Redis transport builds a new redis-py client for every operation.

kombu 5.7's `Channel.conn_or_acquire()` (used by every publish, `_put`, and through
`QoS.pipe_or_acquire` by every delivery record and acknowledgement) returns
`self._create_client()`: a fresh `redis.Redis(connection_pool=...)` each time. The connection
comes from the channel's pool either way, but building the client object is costly in redis-py
8: 90-290 µs of CPU each (measured on this 2-core host, idle and loaded), paid once per
publish in the API and twice per task (record, ack) in a worker, on the path of every call.
No upstream issue asks for exactly this; the nearest is celery/kombu#2572 (the Redis publish
path's per-message cost, batched with pipelines), which leaves `conn_or_acquire` as it is.

`reuse_redis_clients()` makes `conn_or_acquire()` hand out one client per channel, built
the same way (`_create_client`, so credentials and key prefixes stay kombu's) and rebuilt when
the channel's pool is replaced (kombu drops it on a reconnect). A redis-py client is safe to
share between threads and greenlets: each command takes its own connection from the pool, and
pipelines (`client.pipeline()`) are still one per operation. Applied by `make_celery`
(shared/celery_config.py), so the API and the workers both get it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


def reuse_redis_clients() -> None:
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel, "_rerank_client_reuse", False):
        return
    lock = threading.Lock()

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_rerank_sync_client")
        if cached is None or cached.connection_pool is not pool:
            with lock:
                cached = self.__dict__.get("_rerank_sync_client")
                if cached is None or cached.connection_pool is not pool:
                    cached = self._create_client()
                    self.__dict__["_rerank_sync_client"] = cached
        yield cached

    channel.conn_or_acquire = conn_or_acquire
    channel._rerank_client_reuse = True
