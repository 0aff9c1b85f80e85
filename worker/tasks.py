"""Celery tasks: thin wrappers that hand work to the warm worker context and report the outcome."""

from __future__ import annotations

import logging

import redis
from celery import Task, shared_task

from shared import names
from shared.logs import request_id
from shared.schemas import PieceTask, ScoreReply, ScoreTask
from worker.context import WorkerContext
from worker.jobs import run_piece
from worker.realtime import score_call, send_reply

log = logging.getLogger(__name__)


class WorkerTask(Task):
    """Base of our tasks: the worker's context lives on the Celery app (set in worker/__main__.py)."""

    @property
    def ctx(self) -> WorkerContext:
        ctx = getattr(self.app, "worker_context", None)
        if ctx is None:
            raise RuntimeError("no worker context on this Celery app: run the worker with `python -m worker`")
        return ctx


@shared_task(name=names.RERANK_TASK, base=WorkerTask, bind=True, acks_late=True)
def rerank_realtime(self: WorkerTask, payload: dict) -> None:
    task = ScoreTask.model_validate(payload)
    request_id.set(task.request_id)  # every log line of this call carries the API's X-Request-Id
    ctx = self.ctx
    try:
        reply = score_call(ctx, task)
    except Exception as exc:  # the caller gets a clear error; the worker lives on
        log.exception("request %s failed", task.request_id)
        reply = ScoreReply(error=f"scoring failed: {type(exc).__name__}: {exc}", status=500)
    if reply is None:
        ctx.metrics.task_done("realtime", "dropped")
        log.info("request %s: its caller gave up before it was scored; dropped", task.request_id)
        return
    ctx.metrics.task_done("realtime", "error" if reply.error else "ok")
    send_reply(ctx, task.call_id, reply)


@shared_task(
    name=names.BULK_TASK,
    base=WorkerTask,
    bind=True,
    acks_late=True,
    # Storage or Redis hiccups are retried; scoring errors are written as per-item errors.
    autoretry_for=(OSError, redis.RedisError),
    retry_backoff=True,
    max_retries=5,
)
def rerank_bulk_piece(self: WorkerTask, payload: dict) -> None:
    task = PieceTask.model_validate(payload)
    request_id.set(task.job_id)
    outcome = run_piece(self.ctx, task)
    self.ctx.metrics.task_done("bulk", outcome)
    log.info("job %s piece %d: %s", task.job_id, task.piece, outcome)
