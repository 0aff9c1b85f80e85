"""One piece of a bulk job: read its stored input, score it through the engine, write results.

Safe to run twice: the result file is replaced atomically and the job's counters move only the
first time the piece is counted, so a worker killed mid-piece costs a redo, never a hole or a
duplicate. A cancelled job stops within one batch: the piece checks the job's state while the
engine works and, once it is cancelled, has the engine drop the job's pairs not yet scored.
"""

from __future__ import annotations

import logging
import time

from engine import BULK, Encoded, Engine
from engine.errors import Cancelled, EngineFailed
from shared import jobs as job_state
from shared import tracing
from shared.ranking import results_of
from shared.schemas import PieceTask, ScoreOptions
from worker.context import WorkerContext
from worker.scoring import encode_many, failure_of, scored

log = logging.getLogger(__name__)

#: How often a running piece looks whether its job was cancelled.
CANCEL_POLL_SECONDS = 0.25


def run_piece(ctx: WorkerContext, task: PieceTask) -> str:
    """Score one piece; returns what happened: done, redone, cancelled, skipped-*, or failed."""
    try:
        with tracing.span("rerank.piece", {"rerank.job_id": task.job_id, "rerank.piece": task.piece,
                                           "rerank.model": ctx.spec.name}) as span:
            outcome = _run_piece(ctx, task)
            span.set_attribute("rerank.outcome", outcome)
            return outcome
    finally:  # whatever happened, the next piece of some job gets this one's turn (fair turns)
        try:
            ctx.feeder.piece_ended(ctx.spec.name, task.job_id, task.piece)
        except Exception as exc:  # noqa: BLE001 - Redis or the broker is down: the API's feed catches up
            log.warning("could not hand out the next bulk pieces of %s: %s", ctx.spec.name, exc)


def _run_piece(ctx: WorkerContext, task: PieceTask) -> str:
    store, storage = ctx.job_store, ctx.job_storage
    job = store.get(task.job_id)
    if job is None:
        return "skipped-expired"  # the job is unknown or expired
    if job.status == job_state.CANCELLED:
        return "skipped-cancelled"
    if store.piece_done(task.job_id, task.piece):
        return "skipped-duplicate"  # counted already
    store.mark_started(task.job_id)
    tracing.link_to(job.traceparent)  # the call that created the job

    items = list(storage.read_lines(storage.input_path(task.job_id, task.piece)))
    pairs = sum(len(item["documents"]) for item in items)
    options = ScoreOptions.model_validate_json(job.options)
    tracing.current().set_attributes({"rerank.items": len(items), "rerank.pairs": pairs})
    try:
        with tracing.span("rerank.tokenize", {"rerank.items": len(items)}) as span:
            encoded = encode_many(ctx, [(item["query"], item["documents"]) for item in items], options)
            whole = Encoded.concat(encoded)
            span.set_attributes({"rerank.pairs": whole.pairs, "rerank.tokens": whole.tokens})
        ctx.chars_per_token.record(whole.characters, whole.tokenized)
        submitted = time.time()
        handle = ctx.engine.submit(whole, priority=BULK, tag=task.job_id, timed=tracing.recording())
        try:
            while not handle.done.wait(CANCEL_POLL_SECONDS):
                if store.is_cancelled(task.job_id):
                    ctx.engine.cancel(task.job_id)
            logits = handle.wait()
        finally:
            tracing.engine_spans(submitted, getattr(handle, "timings", None), **{"rerank.pairs": whole.pairs})
    except Cancelled:
        return "cancelled"
    except EngineFailed:
        raise  # the engine restarted: the piece goes back to its queue (worker/tasks.py), not failed
    except Exception as exc:  # a piece that cannot be scored is reported, not retried for ever
        log.exception("job %s piece %d failed", task.job_id, task.piece)
        message = failure_of(exc).message
        lines = [{"id": item["id"], "index": item["index"], "error": message} for item in items]
        storage.write_lines(storage.result_path(task.job_id, task.piece), lines)
        store.complete_piece(task.job_id, task.piece, len(items), pairs, errors=len(items), last_error=message)
        return "failed"

    lines, start = [], 0
    for item, enc in zip(items, encoded):
        scores = Engine.merge(enc, logits[start : start + enc.pairs])
        start += enc.pairs
        lines.append({
            "id": item["id"],
            "index": item["index"],
            "results": [r.model_dump(mode="json") for r in results_of(
                scored(scores), item["documents"], options, item.get("top_n"))],
            "meta": {"tokens": {"input_tokens": scores.input_tokens}},
        })
    storage.write_lines(storage.result_path(task.job_id, task.piece), lines)
    counted = store.complete_piece(task.job_id, task.piece, len(items), pairs)
    if counted:
        ctx.metrics.job_items_done(len(items))
    return "done" if counted else "redone"  # redone: a redelivered piece, counted once

