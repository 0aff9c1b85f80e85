"""Work-arounds for kombu's Redis transport (seen with kombu 5.7), in its Channel and QoS classes.

1. Redis went away (celery/kombu#970 and #582 are the same family): when Redis goes away while
   the worker holds unacknowledged messages, kombu later touches the dead channel of those
   messages (to hand them back when the channel closes, or to acknowledge a task that finished
   after the reconnect), finds its connection gone, raises AttributeError, and Celery treats that
   as unrecoverable: the worker exits instead of carrying on.

2. Redis refuses writes (a full disk: `MISCONF`; `maxmemory`: `OOM`). BRPOP is a write, so
   with a full disk Redis answers the consumer's BRPOP with MISCONF; and when a BRPOP did pop a
   message, kombu records it in its `unacked` hash, another write. Either error makes Celery stop
   the worker ("Unrecoverable error: ResponseError"), in the second case with the popped message
   in neither place: a bulk piece lost, its job never finishing. Measured with the launcher's
   Redis on a full 20 MB disk: the worker exited, and once space returned the calls got 503
   until the launcher had restarted it.

A refused BRPOP is read as "no message" after a short pause (Redis takes writes again by itself
when its disk has room). Skipping a failed ack, reject or hand-back is safe: the message stays in Redis's `unacked` hash
and is handed out again (shared/redelivery.py when this worker is gone, or VISIBILITY_TIMEOUT),
and a piece done twice is counted once. Recording a delivered message is retried until Redis
takes writes again (it recovers by itself when its disk has room): the consumer waits, holding the
message, instead of dying; nothing else could be written meanwhile anyway.
"""

from __future__ import annotations

import functools
import logging
import time
from queue import Empty

import redis

from shared import redis_state

log = logging.getLogger(__name__)

#: Redis states in which it answers but refuses writes, and recovers by itself.
WRITES_REFUSED = (redis_state.CANNOT_WRITE, redis_state.OUT_OF_MEMORY, redis_state.READ_ONLY)
RETRY_SECONDS = 0.5


def _writes_refused(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and redis_state.classify(exc).state in WRITES_REFUSED


def apply() -> None:
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    qos = kombu_redis.QoS
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
