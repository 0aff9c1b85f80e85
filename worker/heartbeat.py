"""The worker's heartbeat: its description and metric snapshot in Redis every few seconds.

A thread of the worker process, which never runs a forward pass (the engine process does), so a
long batch or a huge document never delays it and the API never mistakes a busy worker for a
dead one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import redis

from shared import names
from shared.workers import WorkerRegistry
from worker.context import WorkerContext

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, ctx: WorkerContext, on_beat: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.on_beat = on_beat  # e.g. the bulk gate's re-check
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        try:
            WorkerRegistry(self.ctx.redis).withdraw(self.ctx.spec.name, self.ctx.worker_id)
        except redis.RedisError:
            pass

    def wake(self) -> None:
        """Beat now (the engine went away or came back)."""
        self._wake.set()

    def beat(self) -> None:
        ctx = self.ctx
        ttl = 3 * ctx.settings.heartbeat_interval
        if not ctx.engine.connected:
            # Its shared engine is restarting: nothing it takes could be scored, so the API must
            # not count it (503 at once) until the engine is back.
            WorkerRegistry(ctx.redis).withdraw(ctx.spec.name, ctx.worker_id)
            return
        WorkerRegistry(ctx.redis).announce(ctx.spec.name, ctx.worker_id, ctx.describe(), ttl=ttl)
        ctx.redis.set(names.worker_metrics_key(ctx.worker_id), json.dumps(ctx.metrics.snapshot()),
                      px=int(ttl * 1000))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            if self.on_beat is not None:
                self.on_beat()
            self._wake.wait(self.ctx.settings.heartbeat_interval)
            self._wake.clear()
