"""Keep only a few bulk pieces inside a worker, so a realtime call always finds a free thread.

Celery hands a worker as many messages as it has threads, whatever their queue. Left alone, a
long job fills every thread with bulk pieces and a FastGPT call waits for one to finish before it
is even read. The gate stops consuming the bulk queue while `limit` pieces are in the worker and
starts again when one ends; the realtime queue is always consumed. The batcher then puts the
realtime pairs ahead of the bulk ones.
"""

from __future__ import annotations

import logging
import threading

from celery import signals

from shared import names

log = logging.getLogger(__name__)

#: Bulk pieces a worker holds at once: enough to keep the device busy between pieces.
PIECES_IN_FLIGHT = 3


class BulkGate:
    def __init__(self, bulk_queue: str, limit: int = PIECES_IN_FLIGHT) -> None:
        self.queue = bulk_queue
        self.limit = limit
        self.in_flight = 0
        self.paused = False
        self._consumer = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        signals.task_received.connect(self._received, weak=False)
        signals.task_postrun.connect(self._finished, weak=False)

    def _received(self, sender=None, request=None, **_: object) -> None:
        """Consumer thread: a message was taken from the broker."""
        if request is None or request.name != names.BULK_TASK:
            return
        self._consumer = sender
        with self._lock:
            self.in_flight += 1
            pause = self.in_flight >= self.limit and not self.paused
            self.paused = self.paused or pause
        if pause:
            sender.cancel_task_queue(self.queue)  # same thread as the consumer: safe

    def _finished(self, sender=None, **_: object) -> None:
        """Pool thread: a task ended (successfully or not)."""
        if sender is None or sender.name != names.BULK_TASK:
            return
        with self._lock:
            self.in_flight -= 1
            resume = self.paused and self.in_flight < self.limit
            self.paused = self.paused and not resume
        if resume and self._consumer is not None:
            # Queue changes belong to the consumer thread: it runs this at its next loop turn.
            self._consumer.call_soon(self._consumer.add_task_queue, self.queue)
