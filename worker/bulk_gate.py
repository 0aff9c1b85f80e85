"""Keep only a few bulk pieces inside a worker, so a realtime call always finds a free thread.

Celery hands a worker as many messages as it has threads, whatever their queue. Left alone, a
long job fills every thread with bulk pieces and a FastGPT call waits for one to finish before it
is even read. The gate stops consuming the bulk queue while `limit` pieces are in the worker and
consumes it again when one ends; the realtime queue is always consumed. The batcher then puts the
realtime pairs ahead of the bulk ones.

Queue changes belong to the consumer's thread, so they are made there (directly when a message
arrives, through `call_soon` otherwise), and `sync` is also called with every heartbeat: after a
lost and re-established broker connection the consumer state is put right again.
"""

from __future__ import annotations

import logging
import threading

from celery import signals

from shared import names

log = logging.getLogger(__name__)

#: Bulk pieces a worker holds at once: enough to keep the device busy while the next is fetched.
PIECES_IN_FLIGHT = 8


class BulkGate:
    def __init__(self, bulk_queue: str, limit: int = PIECES_IN_FLIGHT) -> None:
        self.queue = bulk_queue
        self.limit = limit
        self.in_flight = 0
        self._consumer = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        signals.task_received.connect(self._received, weak=False)
        signals.task_postrun.connect(self._finished, weak=False)
        signals.worker_ready.connect(self._ready, weak=False)

    def _ready(self, sender=None, **_: object) -> None:
        self._consumer = sender if hasattr(sender, "call_soon") else getattr(sender, "consumer", None)

    def _received(self, sender=None, request=None, **_: object) -> None:
        """Consumer thread: a message was taken from the broker."""
        if request is None or request.name != names.BULK_TASK:
            return
        self._consumer = sender
        with self._lock:
            self.in_flight += 1
        self._apply()

    def _finished(self, sender=None, **_: object) -> None:
        """Pool thread: a task ended (successfully or not)."""
        if sender is None or sender.name != names.BULK_TASK:
            return
        with self._lock:
            self.in_flight -= 1
        self.sync()

    def sync(self) -> None:
        """From any thread: make the consumer's bulk consumption match the number in flight."""
        consumer = self._consumer
        if consumer is not None:
            consumer.call_soon(self._apply)

    def _apply(self) -> None:
        """Consumer thread only."""
        consumer = self._consumer
        if consumer is None or consumer.task_consumer is None:
            return
        with self._lock:
            wanted = self.in_flight < self.limit
        try:
            consuming = consumer.task_consumer.consuming_from(self.queue)
            if consuming and not wanted:
                consumer.cancel_task_queue(self.queue)
            elif wanted and not consuming:
                consumer.add_task_queue(self.queue)
        except Exception as exc:  # the broker connection is down: the next heartbeat tries again
            log.debug("bulk gate could not change the consumer now: %s", exc)
