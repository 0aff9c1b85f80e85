"""A work-around for kombu's Redis transport (seen with kombu 5.7; celery/kombu#970 and #582 are
the same family): when Redis goes away while the worker holds unacknowledged messages, kombu later
touches the dead channel of those messages (to hand them back when the channel closes, or to
acknowledge a task that finished after the reconnect), finds its connection gone, raises
AttributeError, and Celery treats that as unrecoverable: the worker exits instead of carrying on.

Skipping those calls is safe: the messages stay in Redis's `unacked` hash and are handed out again
after VISIBILITY_TIMEOUT by any worker. A synchronous call handed out again has expired and is
dropped; a bulk piece is done again and counted once. Nothing is lost; the worker keeps running.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


def apply() -> None:
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
