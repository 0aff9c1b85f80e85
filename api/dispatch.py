"""Sending a synchronous call to the workers and waiting for its answer.

The call goes on the direct path (REALTIME_PATH=direct, the default): its ScoreTask as JSON,
LPUSHed onto the model's realtime list by the admission script itself (one round trip admits and
queues it), which the workers' realtime threads take from (worker/realtime_consumer.py), as long
as every live worker of the model says it does; otherwise
(REALTIME_PATH=celery, or a worker of an older release) it is a Celery task on the model's realtime
queue. Either way the task carries its deadline, so a worker never scores what nobody waits for,
and the answer comes back on a per-call Redis list that this thread waits on with BLPOP: Celery's
Redis result backend shares one pub/sub connection per process, which is not safe under
gunicorn's threads (celery/celery#3761, #6335).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone

import redis
from kombu.exceptions import OperationalError

from api.admission import (chars_per_token, estimate_cost, pending_limit, retry_after, served_length,
                           workers_layout)
from api.errors import ApiError
from shared import names, redis_client, redis_state, tracing
from shared.celery_config import make_celery
from shared.pending import PendingWork
from shared.schemas import Failure, ScoreOptions, Scored, ScoreReply, ScoreTask
from shared.settings import ModelSpec, Settings
from shared.workers import WorkerRegistry

log = logging.getLogger(__name__)

#: How often a waiting call checks that some worker is still alive for its model.
LIVENESS_CHECK_SECONDS = 1.0


def redis_error(exc: BaseException) -> ApiError:
    """The 503 for a failed Redis command, naming Redis's state (shared/redis_state.py)."""
    state = redis_state.classify(exc)
    log.warning("redis %s: %s", state.state, exc)
    return ApiError(503, state.reason)


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings, "rerank-api")
        # BLPOP holds a connection while it waits, so the socket timeout must outlast one wait.
        self.redis = redis_client.connect(
            settings,
            socket_connect_timeout=2,
            socket_timeout=LIVENESS_CHECK_SECONDS + 5,
            health_check_interval=30,
        )
        self.workers = WorkerRegistry(self.redis)
        self.pending = PendingWork(self.redis)

    def _require_worker(self, model: ModelSpec, *, fresh: bool = False) -> list[dict]:
        workers = self.workers.alive(model.name, fresh=fresh)
        if not workers:
            state = redis_state.probe(self.redis)  # heartbeats stop when Redis refuses writes
            raise ApiError(503, state.reason if not state.ok else
                           f"no worker is serving model {model.name!r} right now")
        return workers

    def score(self, model: ModelSpec, query: str, documents: list[str], request_id: str,
              options: ScoreOptions | None = None) -> Scored:
        """Logits of each document for the query, or ApiError 503/504/500."""
        try:
            return self._score(model, query, documents, request_id, options or ScoreOptions())
        except (redis.RedisError, OperationalError) as exc:
            raise redis_error(exc) from None

    def _score(self, model: ModelSpec, query: str, documents: list[str], request_id: str,
               options: ScoreOptions) -> Scored:
        workers = self._require_worker(model)
        check_instruction(model, options, workers)
        now = time.time()
        deadline = now + self.settings.sync_timeout
        call_id = f"{request_id}.{uuid.uuid4().hex[:12]}"  # the worker's log lines carry the request id
        task = ScoreTask(call_id=call_id, request_id=request_id, query=query, documents=documents,
                         deadline=deadline, options=options)
        # The direct path only while every live worker takes it (one of an older release would not).
        direct = self.settings.realtime_path == "direct" and all(w.get("realtime_direct") for w in workers)
        with tracing.span("rerank.admission", {"rerank.model": model.name}) as span:
            limit = pending_limit(self.settings.max_pending_tokens, workers, self.settings.sync_timeout)
            cost = estimate_cost(query, documents, options, max_length=served_length(workers, model.max_length),
                                 chars_per_token=chars_per_token(workers), max_chunks=self.settings.max_chunks,
                                 pair_layout=workers_layout(workers))
            if direct:
                verdict = self._admit_and_push(model, task, cost, now, limit)
            else:
                verdict = self.pending.admit(model.name, call_id, cost, deadline, now, limit)
            span.set_attributes({"rerank.cost": cost, "rerank.pending": verdict.pending, "rerank.limit": limit,
                                 "rerank.admitted": verdict.admitted})
        master = redis_client.master_address(self.redis)  # Sentinel: where the call was recorded
        if not verdict.admitted:
            raise ApiError(
                429,
                f"model {model.name!r} is busy: {verdict.pending} tokens of work pending (limit {int(limit)}, "
                f"what its workers score within SYNC_TIMEOUT); retry later",
                headers={"Retry-After": str(retry_after(verdict.pending, workers))},
            )
        try:
            if not direct:
                self._publish(model, task)
            with tracing.span("rerank.wait"):
                return self._wait(model, task, master)  # the worker released the call with its answer
        except BaseException:
            try:
                self.pending.release(model.name, call_id)
            except redis.RedisError:
                pass  # the entry expires at its deadline anyway
            raise

    def _admit_and_push(self, model: ModelSpec, task: ScoreTask, cost: int, now: float, limit: float):
        """The direct path: admitted and on the workers' list in one script, one round trip
        (shared/pending.py). The list's expiry, renewed by every call, removes it only once no call
        has come for twice SYNC_TIMEOUT (all it held is then past its deadline): a model nobody
        serves any more leaves nothing behind."""
        key = names.realtime_list(model.name)
        with tracing.publish(names.RERANK_TASK, task.call_id, key, direct=True) as headers:
            if headers:
                task.traceparent = headers.get("traceparent")
            message = task.model_dump_json(exclude_defaults=True)
            return self.pending.admit(model.name, task.call_id, cost, task.deadline, now, limit,
                                      push=(key, message, int(2 * self.settings.sync_timeout) + 1))

    def _publish(self, model: ModelSpec, task: ScoreTask) -> None:
        """A Celery task on the model's realtime queue."""
        deadline = task.deadline
        queue = names.realtime_queue(model.name)
        with tracing.publish(names.RERANK_TASK, task.call_id, queue) as headers:
            self.celery.send_task(
                names.RERANK_TASK,
                args=[task.model_dump()],
                queue=queue,
                expires=datetime.fromtimestamp(deadline, tz=timezone.utc),
                task_id=task.call_id,
                # Celery would render the documents with saferepr for its logs on every call.
                argsrepr=f"<{len(task.documents)} documents>",
                kwargsrepr="{}",
                headers=headers,  # the trace's traceparent when tracing is on
                # The workers declare the queues they consume, and a message for the default exchange
                # goes straight onto the queue's list: kombu's declaration on every publish (a copy of
                # the Queue object, before its cache is even asked) took 16 % of the API's CPU in W2.
                declare=[],
            )

    def _wait(self, model: ModelSpec, task: ScoreTask, master: tuple[str, int] | None) -> Scored:
        deadline = task.deadline
        key = names.reply_key(task.call_id)
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise ApiError(
                    504, f"no answer within {self.settings.sync_timeout:g}s (SYNC_TIMEOUT)"
                )
            item = self.redis.blpop([key], timeout=min(LIVENESS_CHECK_SECONDS, left))
            if item is not None:
                return self._unpack(ScoreReply.model_validate_json(item[1]))
            if master is not None and redis_client.master_address(self.redis) != master:
                # Sentinel promoted a replica meanwhile: the task or its answer may have been written
                # to the old master only (replication is asynchronous), so this wait could be in vain.
                raise ApiError(503, "Redis failed over to a new primary while this call waited; send it again")
            self._require_worker(model, fresh=True)

    @staticmethod
    def _unpack(reply: ScoreReply) -> Scored:
        if reply.failure is not None:
            raise ApiError.of_failure(reply.failure)
        if reply.scored is None:
            raise ApiError(500, "worker returned no scores")
        return reply.scored


def check_instruction(model: ModelSpec, options: ScoreOptions, workers: list[dict]) -> None:
    """Refuse an instruction at once (422) when the live workers' heartbeats say the model's
    family takes none; workers that do not say (an older heartbeat) leave it to the worker,
    which refuses it the same way (worker/scoring.py)."""
    if options.instruction is None or not workers:
        return
    if all(w.get("instruction") is False for w in workers):
        raise ApiError.of_failure(Failure(kind="instruction_not_accepted", message=instruction_refused(model.name)))


def instruction_refused(model: str) -> str:
    return f"model {model!r} takes no instruction (only LLM rerankers such as Qwen3-Reranker do); leave it out"
