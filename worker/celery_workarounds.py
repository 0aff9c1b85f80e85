"""Where Celery and kombu do not do what a warm GPU worker needs: the work-arounds, in one place.

1. `apply_kombu_fixes()`, kombu's Redis transport (seen with kombu 5.7) in two situations:

   a. Redis went away (celery/kombu#970 and #582 are the same family): when Redis goes away
      while the worker holds unacknowledged messages, kombu later touches the dead channel of
      those messages (to hand them back when the channel closes, or to acknowledge a task that
      finished after the reconnect), finds its connection gone, raises AttributeError, and
      Celery treats that as unrecoverable: the worker exits instead of carrying on.
   b. Redis refuses writes (a full disk: `MISCONF`; `maxmemory`: `OOM`). BRPOP is a write, so
      with a full disk Redis answers the consumer's BRPOP with MISCONF; and when a BRPOP did pop
      a message, kombu records it in its `unacked` hash, another write. Either error makes Celery
      stop the worker ("Unrecoverable error: ResponseError"), in the second case with the popped
      message in neither place: a bulk piece lost, its job never finishing. Measured with the
      launcher's Redis on a full 20 MB disk: the worker exited, and once space returned the calls
      got 503 until the launcher had restarted it.

   Skipping a failed ack, reject or hand-back is safe: the message stays in Redis's `unacked`
   hash and is handed out again by another worker (shared/redelivery.py once this one is gone,
   else VISIBILITY_TIMEOUT); a synchronous call handed out again has expired and is dropped, a
   bulk piece is done again and counted once. A refused BRPOP reads as "no message" after a short
   pause, and recording a delivered message is retried until Redis takes writes again (it does by
   itself once its disk has room): the consumer waits, holding the message, instead of dying.

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

3. kombu builds a redis-py client for every publish, delivery record and ack (90-290 µs of CPU
   each): that work-around is needed by the API too, which cannot import this package, so it
   lives in shared/kombu_clients.py (applied by `make_celery`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from queue import Empty

import redis
from celery import signals

from shared import names, redis_state

log = logging.getLogger(__name__)

#: Bulk pieces a worker holds at once: enough to keep the device busy while the next is fetched.
PIECES_IN_FLIGHT = 8


#: Redis states in which it answers but refuses writes, and recovers by itself.
WRITES_REFUSED = (redis_state.CANNOT_WRITE, redis_state.OUT_OF_MEMORY, redis_state.READ_ONLY)
RETRY_SECONDS = 0.5


def _writes_refused(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and redis_state.classify(exc).state in WRITES_REFUSED


def apply_kombu_fixes() -> None:
    from kombu.transport import redis as kombu_redis

    channel, qos = kombu_redis.Channel, kombu_redis.QoS
    if getattr(qos, "_rerank_patched", False):
        return
    gone = (AttributeError, *kombu_redis.Transport.connection_errors)

    def tolerant(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except gone as exc:
                log.warning("%s on a channel whose Redis connection is gone (%s): Redis hands the "
                            "message(s) out again", method.__name__, type(exc).__name__)
            except redis.ResponseError as exc:
                if not _writes_refused(exc):
                    raise
                log.warning("%s refused by Redis (%s): the message stays unacknowledged and is handed "
                            "out again", method.__name__, redis_state.classify(exc).reason)
            return None

        return wrapper

    def recorded_when_writable(append):
        @functools.wraps(append)
        def wrapper(self, message, delivery_tag):
            from celery.worker import state as worker_state

            waited = 0.0
            while True:
                try:
                    result = append(self, message, delivery_tag)
                    if waited:
                        log.warning("Redis takes writes again after %.1fs; message %s recorded",
                                    waited, delivery_tag)
                    return result
                except redis.ResponseError as exc:
                    if not _writes_refused(exc):
                        raise
                    if worker_state.should_stop is not None or worker_state.should_terminate is not None:
                        log.error("stopping while Redis refuses writes: message %s (task %s) is dropped",
                                  delivery_tag, message.headers.get("id"))
                        raise
                    if not waited:
                        log.warning("%s: holding message %s until Redis takes writes again",
                                    redis_state.classify(exc).reason, delivery_tag)
                time.sleep(RETRY_SECONDS)
                waited += RETRY_SECONDS

        return wrapper

    def paused_while_refused(brpop_read):
        last_warning = [0.0]

        @functools.wraps(brpop_read)
        def wrapper(self, **options):
            try:
                return brpop_read(self, **options)
            except redis.ResponseError as exc:
                if not _writes_refused(exc):
                    raise
                if time.monotonic() - last_warning[0] > 10:
                    last_warning[0] = time.monotonic()
                    log.warning("%s: not taking work until it can", redis_state.classify(exc).reason)
                time.sleep(RETRY_SECONDS)
                raise Empty() from None  # kombu's "no message": the next poll sends BRPOP again

        return wrapper

    for name in ("restore_unacked", "ack", "reject"):
        setattr(qos, name, tolerant(getattr(qos, name)))
    qos.append = recorded_when_writable(qos.append)
    channel._brpop_read = paused_while_refused(channel._brpop_read)
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
