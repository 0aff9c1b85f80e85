"""A synchronous call: encode, score through the engine, push the answer on the caller's list."""

from __future__ import annotations

import logging
import time

from engine import REALTIME, DocumentPolicy, Engine, InputTooLong
from engine.errors import EngineFailed, Expired
from shared import names
from shared.schemas import ScoreOptions, ScoreReply, ScoreTask
from worker.context import WorkerContext

log = logging.getLogger(__name__)

#: How long an answer waits in Redis for its caller, who is normally already blocked on it.
REPLY_TTL_SECONDS = 60
#: A call younger than this is still wanted (its caller waits at least a liveness check, 1 s).
FRESH_SECONDS = 0.5


def policy_of(options: ScoreOptions, max_chunks: int) -> DocumentPolicy:
    """The engine's document policy for a task's ScoreOptions (the wire format, shared/schemas.py);
    windows per document are capped by MAX_CHUNKS."""
    return DocumentPolicy(direction=options.direction, max_doc_tokens=options.max_doc_tokens,
                          chunk_overlap=options.chunk_overlap,
                          max_chunks=min(options.max_chunks or max_chunks, max_chunks), truncate=options.truncate)


def score_call(ctx: WorkerContext, task: ScoreTask) -> ScoreReply | None:
    """Score one synchronous call; None when its caller has already given up."""
    started = time.perf_counter()
    now = time.time()
    if task.deadline <= now:
        return None
    # A call queued for a while may have been given up by its caller (a 503 while this worker
    # looked dead): ask before scoring. A call sent less than FRESH_SECONDS ago has not: no round trip.
    sent_at = task.deadline - ctx.settings.sync_timeout
    if now - sent_at > FRESH_SECONDS and not ctx.pending.waiting(ctx.spec.name, task.call_id):
        return None
    try:
        encoded = ctx.engine.encoder.encode(task.query, task.documents,
                                              policy_of(task.options, ctx.settings.max_chunks))
    except InputTooLong as exc:
        return ScoreReply(error=str(exc), status=413)
    ctx.chars_per_token.record(encoded.characters, encoded.tokenized)
    try:
        logits = ctx.engine.run(encoded, priority=REALTIME, deadline=task.deadline,
                                timeout=max(task.deadline - time.time(), 0))
    except Expired:
        return None
    except EngineFailed as exc:
        # Its engine died (a shared one is restarted by the launcher and rejoined): a clear 503
        # now beats a wait for the deadline; the caller may retry at once.
        return ScoreReply(error=f"the model's engine restarted while scoring this call: {exc}", status=503)
    scores = Engine.merge(encoded, logits)
    log.info("scored %d pairs (%d tokens) in %.1f ms", encoded.pairs, encoded.tokens,
             (time.perf_counter() - started) * 1000)
    return ScoreReply(
        logits=scores.logits.tolist(), input_tokens=scores.input_tokens,
        chunks=scores.chunks.tolist() if scores.chunks is not None else None,
        truncated=scores.truncated.tolist() if scores.truncated is not None else None,
    )


def send_reply(ctx: WorkerContext, call_id: str, reply: ScoreReply) -> None:
    """The answer on the caller's list, and the call out of the pending ledger: one round trip."""
    key = names.reply_key(call_id)
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.rpush(key, reply.model_dump_json(exclude_none=True))
    pipe.expire(key, REPLY_TTL_SECONDS)
    ctx.pending.release(ctx.spec.name, call_id, pipe)
    pipe.execute()
