"""Celery tasks: thin wrappers that hand work to the warm worker context and report the outcome."""

from __future__ import annotations

import logging
import time

import redis
from celery import Task, shared_task
from celery.exceptions import Reject

from engine.errors import EngineFailed
from shared import names, tracing
from shared.logs import request_id
from shared.schemas import PieceTask, ScoreTask
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
    tracing.current().set_attributes({"rerank.request_id": task.request_id, "rerank.model": ctx.spec.name,
                                      "rerank.documents": len(task.documents)})
    reply = score_call(ctx, task)
    if reply is None:
        ctx.metrics.task_done("realtime", "dropped")
        log.info("request %s: its caller gave up before it was scored; dropped", task.request_id)
        return
    ctx.metrics.task_done("realtime", "error" if reply.failure else "ok")
    send_reply(ctx, task.call_id, reply)


#: How long a piece whose engine restarted waits for it before going back to its queue.
ENGINE_WAIT_SECONDS = 30

#: Tries of a piece whose storage fails (an object store hiccup) before its job fails visibly.
STORAGE_TRIES = 4


@shared_task(name=names.BULK_TASK, base=WorkerTask, bind=True, acks_late=True)
def rerank_bulk_piece(self: WorkerTask, payload: dict) -> None:
    """Score one stored piece of a job. A piece is never dropped: scoring errors become per-item
    error lines; storage that fails for good (its input gone, or failing STORAGE_TRIES times)
    fails the piece, and so its job, visibly; while Redis cannot be reached or written the
    message goes back to the broker (or stays unacknowledged there, to be handed out again), never
    acknowledged unfinished as a Celery retry would do if its own re-publishing failed."""
    task = PieceTask.model_validate(payload)
    request_id.set(task.job_id)
    ctx = self.ctx
    for attempt in range(STORAGE_TRIES):
        try:
            outcome = run_piece(ctx, task)
            break
        except redis.RedisError as exc:
            log.warning("job %s piece %d: Redis unusable (%s); handing the piece back", task.job_id, task.piece, exc)
            time.sleep(1)  # no hot loop while Redis is away
            raise Reject(exc, requeue=True) from None
        except EngineFailed as exc:
            # The engine died mid-piece (a shared one comes back; a worker's own takes the worker
            # with it): hand the piece back once the engine is back, or after a pause.
            log.warning("job %s piece %d: %s; handing the piece back", task.job_id, task.piece, exc)
            ctx.engine.wait_ready(ENGINE_WAIT_SECONDS)
            raise Reject(exc, requeue=True) from None
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or attempt + 1 == STORAGE_TRIES:
                log.error("job %s piece %d failed for good: %s", task.job_id, task.piece, exc)
                ctx.job_store.fail_piece(task.job_id, task.piece, f"{type(exc).__name__}: {exc}")
                outcome = "failed"
                break
            time.sleep(2**attempt)  # storage hiccup: try again shortly
    ctx.metrics.task_done("bulk", outcome)
    log.info("job %s piece %d: %s", task.job_id, task.piece, outcome)
