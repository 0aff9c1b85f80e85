"""A synchronous call: encode, score through the engine, push the answer on the caller's list."""

from __future__ import annotations

import logging
import time

import redis

from engine import REALTIME, Engine
from engine.errors import Expired
from shared import names, tracing
from shared.schemas import ScoreReply, ScoreTask
from worker.context import WorkerContext
from worker.scoring import encode, failure_of, scored

log = logging.getLogger(__name__)

#: How long an answer waits in Redis for its caller, who is normally already blocked on it.
REPLY_TTL_SECONDS = 60
#: A call younger than this is still wanted (its caller waits at least a liveness check, 1 s).
FRESH_SECONDS = 0.5


def score_call(ctx: WorkerContext, task: ScoreTask) -> ScoreReply | None:
    """Score one synchronous call; None when its caller has already given up. Any error is the
    reply's Failure (worker/scoring.py names it): the caller gets a clear answer, the worker lives on."""
    try:
        return _score(ctx, task)
    except Expired:
        return None
    except Exception as exc:
        failure = failure_of(exc)
        if failure.kind == "scoring_failed":
            log.exception("request %s failed", task.request_id)
        return ScoreReply(failure=failure)


def _score(ctx: WorkerContext, task: ScoreTask) -> ScoreReply | None:
    started = time.perf_counter()
    now = time.time()
    if task.deadline <= now:
        return None
    # A call queued for a while may have been given up by its caller (a 503 while this worker
    # looked dead): ask before scoring. A call sent less than FRESH_SECONDS ago has not: no round trip.
    sent_at = task.deadline - ctx.settings.sync_timeout
    if now - sent_at > FRESH_SECONDS and not ctx.pending.waiting(ctx.spec.name, task.call_id):
        return None
    with tracing.span("rerank.tokenize", {"rerank.documents": len(task.documents)}) as span:
        encoded = encode(ctx, task.query, task.documents, task.options)
        span.set_attributes({"rerank.pairs": encoded.pairs, "rerank.tokens": encoded.tokens})
    ctx.chars_per_token.record(encoded.characters, encoded.tokenized)
    timed = tracing.recording()  # the engine times nothing for a call that is not traced
    submitted = time.time()
    handle = ctx.engine.submit(encoded, priority=REALTIME, deadline=task.deadline, timed=timed)
    try:
        logits = handle.wait(max(task.deadline - time.time(), 0))
    finally:
        if timed:
            tracing.engine_spans(submitted, handle.timings, **{"rerank.pairs": encoded.pairs})
    scores = Engine.merge(encoded, logits)
    log.info("scored %d pairs (%d tokens) in %.1f ms", encoded.pairs, encoded.tokens,
             (time.perf_counter() - started) * 1000)
    return ScoreReply(scored=scored(scores))


def send_reply(ctx: WorkerContext, call_id: str, reply: ScoreReply, held: tuple[str, bytes] | None = None) -> None:
    """The answer on the caller's list, and the call out of the pending ledger (and, taken from
    the direct path, off this worker's held list: `held` is the list and the message): one round trip."""
    with tracing.span("rerank.reply", {"rerank.failure": reply.failure.kind} if reply.failure else None):
        _push_reply(ctx, call_id, reply, held)


def _push_reply(ctx: WorkerContext, call_id: str, reply: ScoreReply, held: tuple[str, bytes] | None) -> None:
    key = names.reply_key(call_id)
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.rpush(key, reply.model_dump_json(exclude_none=True))
    pipe.expire(key, REPLY_TTL_SECONDS)
    ctx.pending.release(ctx.spec.name, call_id, pipe)
    if held is not None:
        pipe.lrem(held[0], 1, held[1])
    try:
        pipe.execute()
    except redis.exceptions.NoScriptError:  # Redis lost its scripts (shared/pending.py); the rest ran
        ctx.pending.release(ctx.spec.name, call_id)
