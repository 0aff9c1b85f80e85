"""Celery tasks: thin wrappers that hand work to the warm runtime and send the answer back."""

from __future__ import annotations

import logging

import redis
from celery import shared_task

from shared import names
from shared.logs import request_id
from shared.schemas import PieceTask, ScoreReply, ScoreTask
from worker import runtime
from worker.jobs import run_piece

log = logging.getLogger(__name__)


@shared_task(name=names.RERANK_TASK, acks_late=True)
def rerank_realtime(payload: dict) -> None:
    task = ScoreTask.model_validate(payload)
    request_id.set(task.request_id)  # every log line of this call carries the API's X-Request-Id
    rt = runtime.current()
    try:
        reply = rt.score(task)
    except Exception as exc:  # the caller gets a clear error; the worker lives on
        log.exception("request %s failed", task.request_id)
        reply = ScoreReply(error=f"scoring failed: {type(exc).__name__}: {exc}", status=500)
    if reply is None:
        rt.metrics.task_done("realtime", "dropped")
        log.info("request %s: its caller gave up before it was scored; dropped", task.request_id)
        return
    rt.metrics.task_done("realtime", "error" if reply.error else "ok")
    rt.reply(task.call_id, reply)


@shared_task(
    name=names.BULK_TASK,
    acks_late=True,
    # Storage or Redis hiccups are retried; scoring errors are written as per-item errors.
    autoretry_for=(OSError, redis.RedisError),
    retry_backoff=True,
    max_retries=5,
)
def rerank_bulk_piece(payload: dict) -> None:
    task = PieceTask.model_validate(payload)
    request_id.set(task.job_id)
    rt = runtime.current()
    outcome = run_piece(rt, task)
    rt.metrics.task_done("bulk", outcome)
    log.info("job %s piece %d: %s", task.job_id, task.piece, outcome)
