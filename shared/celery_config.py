"""The Celery app both sides build: the API to send tasks, the workers to run them.

Security and reliability choices live here once: JSON only (a pickled message is refused, never
executed), late acknowledgement (a task a dead worker held is handed out again), and queues read
in priority order so realtime work is always taken before bulk work.
"""

from __future__ import annotations

from celery import Celery

from shared import redis_client
from shared.kombu_clients import reuse_redis_clients
from shared.settings import Settings


def make_celery(settings: Settings, main: str) -> Celery:
    reuse_redis_clients()  # shared/kombu_clients.py: one redis-py client per channel, not per operation
    broker_url, sentinel_options = redis_client.broker(settings)  # REDIS_URL=sentinel://…: kombu's form
    app = Celery(main, broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Answers travel on our own reply lists (see api/dispatch.py), not a result backend.
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=False,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        # Publishing must fail fast when Redis is gone: the caller answers 503 instead of hanging.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # kombu's virtual transports wrap every body in base64 inside the JSON envelope
            # (Channel.body_encoding, kombu/transport/virtual/base.py): a third more bytes in Redis,
            # its append-only file and every socket, and an encode and decode per message. Our
            # bodies are JSON text already, so they go in as they are. A consumer decodes each
            # message by its own `body_encoding` property, so workers of either setting mix.
            "body_encoding": None,
            # BRPOP waits at most this long, so work queued for the consumer's own thread (the
            # bulk gate re-opening the bulk queue) waits at most 0.1 s, not 1 s. Redis >= 6.
            "polling_interval": 0.1,
            **sentinel_options,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app
