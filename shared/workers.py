"""Which workers are alive, per model: heartbeats in Redis.

A worker refreshes a key with a short expiry; the API reads them to answer 503 at once when no
worker serves a model (instead of letting the call wait for its timeout), and for /v1/models.
Server-side expiry means no clock has to agree with another.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

from shared import names


class WorkerRegistry:
    def __init__(self, client: redis.Redis, *, cache_seconds: float = 1.0) -> None:
        self._redis = client
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    # --- worker side ---------------------------------------------------------------------------
    def announce(self, model: str, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        pipe = self._redis.pipeline()
        pipe.set(names.worker_key(worker_id), json.dumps(info), px=int(ttl * 1000))
        pipe.sadd(names.workers_key(model), worker_id)
        pipe.execute()

    def withdraw(self, model: str, worker_id: str) -> None:
        pipe = self._redis.pipeline()
        pipe.delete(names.worker_key(worker_id))
        pipe.srem(names.workers_key(model), worker_id)
        pipe.execute()

    # --- API side ------------------------------------------------------------------------------
    def alive(self, model: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        """Descriptions of the live workers of a model (cached briefly unless `fresh`)."""
        now = time.monotonic()
        if not fresh:
            with self._lock:
                hit = self._cache.get(model)
            if hit and now - hit[0] < self._cache_seconds:
                return hit[1]
        ids = sorted(self._redis.smembers(names.workers_key(model)))
        infos: list[dict[str, Any]] = []
        if ids:
            values = self._redis.mget([names.worker_key(i.decode()) for i in ids])
            dead = [i for i, v in zip(ids, values) if v is None]
            infos = [json.loads(v) for v in values if v is not None]
            if dead:  # forget workers whose heartbeat expired
                self._redis.srem(names.workers_key(model), *dead)
        with self._lock:
            self._cache[model] = (now, infos)
        return infos


def per_engine(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The live workers grouped by the engine they feed (several feed one shared engine): one
    description per engine, with its feeders counted and their measured pace summed (each batch
    is reported to one feeder only), and its capacity counted once."""
    engines: dict[str, dict[str, Any]] = {}
    for w in workers:
        key = w.get("engine_id") or w.get("id") or str(id(w))
        e = engines.get(key)
        if e is None:
            engines[key] = dict(w, feeders=1)
            continue
        e["feeders"] += 1
        for field in ("cost_per_second", "pairs_per_second"):
            e[field] = (e.get(field) or 0.0) + (w.get(field) or 0.0)
        e["capacity"] = max(e.get("capacity") or 0.0, w.get("capacity") or 0.0)
    return list(engines.values())
