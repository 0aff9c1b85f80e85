"""One piece of a bulk job: read its stored input, score it with the shared batcher, write results.

Safe to run twice: the result file is replaced atomically and the job's counters move only the
first time the piece is counted, so a worker killed mid-piece costs a redo, never a hole or a
duplicate.
"""

from __future__ import annotations

import logging

from celery import current_app

from shared import jobs as job_state
from shared.feed import after_piece
from shared.ranking import shape_results
from shared.schemas import PieceTask, ScoreOptions
from worker.batching import BULK
from worker.runtime import Runtime
from worker.scoring import best_per_document, document_policy, encode_documents

log = logging.getLogger(__name__)


def run_piece(rt: Runtime, task: PieceTask) -> str:
    """Score one piece; returns what happened: done, redone, skipped-*, or failed."""
    try:
        return _run_piece(rt, task)
    finally:  # whatever happened, the next piece of some job gets this one's turn (fair turns)
        after_piece(rt.redis, current_app, rt.settings.visibility_timeout, rt.spec.name, task.job_id, task.piece)


def _run_piece(rt: Runtime, task: PieceTask) -> str:
    store, storage = rt.job_store, rt.job_storage
    job = store.get(task.job_id)
    if job is None:
        return "skipped-expired"  # the job is unknown or expired
    if job.status == job_state.CANCELLED:
        return "skipped-cancelled"
    if store.piece_done(task.job_id, task.piece):
        return "skipped-duplicate"  # counted already
    store.mark_started(task.job_id)

    items = list(storage.read_lines(storage.input_path(task.job_id, task.piece)))
    pairs = sum(len(item["documents"]) for item in items)
    policy = document_policy(ScoreOptions.model_validate_json(job.options))
    try:
        with rt.batcher.incoming():
            encoded = [encode_documents(rt.reranker, item["query"], item["documents"], None, policy)
                       for item in items]
        flat = [seq for seqs, _ in encoded for seq in seqs]
        logits = rt.batcher.submit(flat, priority=BULK).wait()
    except Exception as exc:  # a piece that cannot be scored is reported, not retried for ever
        log.exception("job %s piece %d failed", task.job_id, task.piece)
        message = f"{type(exc).__name__}: {exc}"
        lines = [{"id": item["id"], "index": item["index"], "error": message} for item in items]
        storage.write_lines(storage.result_path(task.job_id, task.piece), lines)
        store.complete_piece(task.job_id, task.piece, len(items), pairs, errors=len(items), last_error=message)
        return "failed"

    lines, start = [], 0
    for item, (seqs, owners) in zip(items, encoded):
        item_logits, chunks = best_per_document(logits[start : start + len(seqs)], owners, len(item["documents"]))
        start += len(seqs)
        lines.append({
            "id": item["id"],
            "index": item["index"],
            "results": shape_results(item_logits, item["documents"], raw_scores=job.raw_scores,
                                     top_n=item.get("top_n"), return_documents=job.return_documents,
                                     chunks=chunks if job.return_chunks else None),
            "meta": {"tokens": {"input_tokens": sum(len(s) for s in seqs)}},
        })
    storage.write_lines(storage.result_path(task.job_id, task.piece), lines)
    counted = store.complete_piece(task.job_id, task.piece, len(items), pairs)
    return "done" if counted else "redone"  # redone: a redelivered piece, counted once
