"""Where Celery and kombu do not do what a warm GPU worker needs: the work-arounds, in one place.

1. `apply_kombu_fixes()`: when Redis goes away while the worker holds unacknowledged messages,
   kombu's Redis transport (seen with kombu 5.7; celery/kombu#970 and #582 are the same family)
   later touches the dead channel of those messages (to hand them back when the channel closes,
   or to acknowledge a task that finished after the reconnect), finds its connection gone,
   raises AttributeError, and Celery treats that as unrecoverable: the worker exits instead of
   carrying on. Skipping those calls is safe: the messages stay in Redis's `unacked` hash and are
   handed out again by any worker. A synchronous call handed out again has expired and is
   dropped; a bulk piece is done again and counted once.

2. `BulkGate`: Celery has no per-queue concurrency limit (celery/celery#1599, "consume from a
   queue with a lower concurrency"): it hands a worker as many messages as it has threads,
   whatever their queue. Left alone, a long job fills every thread with bulk pieces and a
   FastGPT call waits for one to finish before it is even read. The gate stops consuming the bulk
   queue while `limit` pieces are in the worker and consumes it again when one ends; the realtime
   queue is always consumed, and the engine puts realtime pairs ahead of bulk ones. Queue changes
   belong to the consumer's thread, so they are made there (directly when a message arrives,
   through `call_soon` otherwise), and `sync` also runs with every heartbeat: after a lost and
   re-established broker connection the consumer state is put right again. Celery logs every
   such switch at INFO (about ten lines a second during a job); the gate mutes those two lines.
"""

from __future__ import annotations

import functools
import logging
import threading

from celery import signals

from shared import names

log = logging.getLogger(__name__)

#: Bulk pieces a worker holds at once: enough to keep the device busy while the next is fetched.
PIECES_IN_FLIGHT = 8


def apply_kombu_fixes() -> None:
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    if getattr(qos, "_rerank_patched", False):
        return
    tolerated = (AttributeError, *kombu_redis.Transport.connection_errors)

    def tolerant(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except tolerated as exc:
                log.warning("%s on a channel whose Redis connection is gone (%s): Redis hands the "
                            "message(s) out again after VISIBILITY_TIMEOUT", method.__name__, type(exc).__name__)
                return None

        return wrapper

    for name in ("restore_unacked", "ack", "reject"):
        setattr(qos, name, tolerant(getattr(qos, name)))
    qos._rerank_patched = True


class BulkGate:
    def __init__(self, bulk_queue: str, limit: int = PIECES_IN_FLIGHT) -> None:
        self.queue = bulk_queue
        self.limit = limit
        self.in_flight = 0
        self._consumer = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        logging.getLogger("celery.worker.consumer.consumer").addFilter(self._quiet)
        signals.task_received.connect(self._received, weak=False)
        signals.task_postrun.connect(self._finished, weak=False)
        signals.worker_ready.connect(self._ready, weak=False)

    def _quiet(self, record: logging.LogRecord) -> bool:
        """Drop Celery's line about each switch of the bulk queue; keep every other line."""
        return not (record.msg in ("Started consuming from %s", "Canceling queue %s")
                    and record.args == (self.queue,))

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
