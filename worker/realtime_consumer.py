"""The direct path: threads that take synchronous calls from the model's Redis list, not Celery.

A synchronous call is one small task that must be answered within milliseconds, and Celery made
it cost five Redis round trips and about 4 ms of CPU (the kombu envelope, BRPOP in the event loop,
the unacknowledged-message record in a MULTI, the hand-off to a pool thread, the acknowledgement
in another MULTI; bench/hops.py, docs/performance.md). Here each of WORKER_CONCURRENCY threads
takes a call with one BLMOVE, onto this worker's held list (names.realtime_held_key), scores it
as the Celery task does (worker/realtime.py) and answers it, releases it from the pending ledger
and takes it off the held list in one pipeline: two round trips a call.

What Celery gave and this keeps:
- **Nothing accepted is lost to a crash.** A call stays on the held list until its answer is
  pushed. A worker that dies stops heartbeating, and a live worker's reaper puts its held calls
  back on the list (shared/redelivery.py); a call whose caller has given up is dropped unscored.
- **A bad message never takes the worker down.** One that does not parse is answered with a
  failure (a 500: the API wrote it) when its call id can be read, logged and dropped otherwise.
- **No call is taken that cannot be scored.** While the shared engine restarts the threads wait
  for it (the heartbeat has withdrawn the worker meanwhile, so the API answers 503), and a
  worker shutting down stops taking calls and finishes the ones it holds.
Bulk pieces stay Celery tasks (worker/tasks.py): they need its acknowledgement and retries,
and a few milliseconds per piece of thousands of pairs do not matter.
"""

from __future__ import annotations

import json
import logging
import threading

import redis
from pydantic import ValidationError

from shared import names, tracing
from shared.logs import request_id
from shared.schemas import Failure, ScoreReply, ScoreTask
from worker.context import WorkerContext
from worker.realtime import score_call, send_reply

log = logging.getLogger(__name__)

#: BLMOVE waits at most this long (a stopping worker wakes its threads at once: CLIENT UNBLOCK).
TAKE_TIMEOUT_SECONDS = 1.0
#: Pause after a failed Redis command, so a Redis that is away is not asked in a hot loop.
REDIS_RETRY_SECONDS = 0.5


class RealtimeConsumer:
    def __init__(self, ctx: WorkerContext, threads: int) -> None:
        self.ctx = ctx
        self.list = names.realtime_list(ctx.spec.name)
        self.held = names.realtime_held_key(ctx.worker_id)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), name=f"realtime-{n}", daemon=True)
                         for n in range(threads)]
        self._client_ids: dict[int, int | None] = {}  # thread -> the Redis CLIENT ID its BLMOVE blocks on

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> None:
        """Take no more calls; wait up to `timeout` seconds for the ones being scored. Threads
        waiting in BLMOVE are unblocked (Redis answers as if it timed out: nothing is moved)."""
        self._stop.set()
        for client_id in list(self._client_ids.values()):
            if client_id is not None:
                try:
                    self.ctx.redis.client_unblock(client_id)
                except redis.RedisError:
                    pass  # they wake within TAKE_TIMEOUT_SECONDS anyway
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, n: int) -> None:
        client: redis.Redis | None = None  # a connection of its own, whose id `stop` can unblock
        while not self._stop.is_set():
            if not self.ctx.engine.connected:  # a shared engine restarting: leave calls to others
                self.ctx.engine.wait_ready(TAKE_TIMEOUT_SECONDS)
                continue
            try:
                if client is None:
                    client = redis.Redis(connection_pool=self.ctx.redis.connection_pool, single_connection_client=True)
                    self._client_ids[n] = client.client_id()
                raw = client.blmove(self.list, self.held, TAKE_TIMEOUT_SECONDS, "RIGHT", "LEFT")
            except Exception as exc:  # noqa: BLE001 - Redis away (or a bug): this thread must live on
                log.warning("could not take a call from %s: %s", self.list, exc)
                self._client_ids[n] = None
                client = _closed(client)  # reconnected, it would have another id
                self._stop.wait(REDIS_RETRY_SECONDS)
                continue
            if raw is not None:
                self.handle(raw)
        self._client_ids[n] = None
        _closed(client)

    def handle(self, raw: bytes) -> None:
        """Score one call taken from the list and answer it; never raises."""
        try:
            task = ScoreTask.model_validate_json(raw)
        except ValidationError as exc:
            self._refuse(raw, exc)
            return
        request_id.set(task.request_id)  # every log line of this call carries the API's X-Request-Id
        ctx = self.ctx
        try:
            with tracing.consume(names.RERANK_TASK, task.traceparent, {
                    "messaging.destination.name": self.list, "messaging.message.id": task.call_id,
                    "rerank.request_id": task.request_id, "rerank.model": ctx.spec.name,
                    "rerank.documents": len(task.documents)}):
                reply = score_call(ctx, task)
                if reply is None:
                    ctx.metrics.task_done("realtime", "dropped")
                    log.info("request %s: its caller gave up before it was scored; dropped", task.request_id)
                    self._forget(raw)
                    return
                ctx.metrics.task_done("realtime", "error" if reply.failure else "ok")
                send_reply(ctx, task.call_id, reply, held=(self.held, raw))
        except redis.RedisError as exc:
            # The answer could not be written: its caller gets a 503 or 504 from the API. The call
            # leaves the held list if Redis lets it (if not, it goes back to the list should this
            # worker die, and is dropped there, its caller gone).
            log.warning("request %s: could not answer: %s", task.request_id, exc)
            self._forget(raw)
        except Exception:  # noqa: BLE001 - a bug must not end this thread, nor the worker
            log.exception("request %s: unexpected failure on the direct path", task.request_id)
            self._forget(raw)
        finally:
            request_id.set("")

    def _refuse(self, raw: bytes, exc: ValidationError) -> None:
        """A message that is not a ScoreTask: answer its caller if it can be found, drop it."""
        log.error("dropped a malformed call from %s: %s", self.list, exc.errors(include_input=False)[:3])
        try:
            call_id = json.loads(raw).get("call_id")
        except (ValueError, AttributeError):
            call_id = None
        try:
            if isinstance(call_id, str) and call_id:
                failure = Failure(kind="scoring_failed", message="the worker could not read this call")
                send_reply(self.ctx, call_id, ScoreReply(failure=failure), held=(self.held, raw))
            else:
                self._forget(raw)
        except redis.RedisError as exc2:
            log.warning("could not drop a malformed call: %s", exc2)

    def _forget(self, raw: bytes) -> None:
        try:
            self.ctx.redis.lrem(self.held, 1, raw)
        except redis.RedisError as exc:
            log.warning("could not take a call off %s: %s", self.held, exc)


def _closed(client: redis.Redis | None) -> None:
    """Hand a thread's own connection back (None: nothing to do); returns None."""
    if client is not None:
        try:
            client.close()
        except redis.RedisError:
            pass
    return None
