"""The worker's side of dead-worker redelivery (shared/redelivery.py): Celery signal hooks.

Every task message this worker receives is listed under its id; every heartbeat stamps it alive
and hands back the messages of workers that stopped stamping (killed, OOM-killed, frozen host).
"""

from __future__ import annotations

import logging

import redis
from celery import Celery, signals

from shared import names
from shared.redelivery import Redelivery

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, app: Celery, client: redis.Redis, worker_id: str, redeliver_after: float) -> None:
        self.app = app
        self.redelivery = Redelivery(client, worker_id, redeliver_after)

    def connect(self) -> None:
        signals.task_received.connect(self._received, weak=False)

    def _received(self, sender=None, request=None, **_: object) -> None:
        """Consumer thread: kombu has just recorded the message as unacknowledged. Only bulk
        pieces are listed: a realtime call handed out again would be past its deadline (its caller
        got its 503 when the worker's heartbeat stopped), and listing costs the consumer thread a
        Redis round trip per message."""
        if request is None or request.name != names.BULK_TASK:
            return
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is None:
            return
        try:
            self.redelivery.hold(tag)
        except redis.RedisError as exc:  # not listed: VISIBILITY_TIMEOUT still hands it out
            log.warning("could not list message %s as held by this worker: %s", tag, exc)

    def takes_realtime(self, realtime_list: str) -> None:
        """The direct path's calls this worker holds go back to `realtime_list` should it die."""
        try:
            self.redelivery.takes_realtime(realtime_list)
        except redis.RedisError as exc:  # the next heartbeat records it
            log.warning("could not record where this worker's calls go back: %s", exc)

    def beat(self) -> None:
        """Heartbeat thread."""
        try:
            self.redelivery.heartbeat()
            self.redelivery.reap(self.app)
        except Exception as exc:  # noqa: BLE001 - Redis down or full: the next heartbeat tries again
            log.warning("redelivery check failed: %s", exc)
