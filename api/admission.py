"""Backpressure: how much realtime work may be pending per model, and what a call costs.

Work is counted by its cost as the batcher counts it (padded tokens, attention-scaled beyond 512),
estimated from the text before anything is queued: a call of 100 long documents weighs what it
costs, not what 100 one-word documents do. A call that would push the pending total past the
bound is refused at once (429 + Retry-After) instead of waiting in a queue it cannot leave
before its timeout. The ledger itself is shared/pending.py.

The bound is what the live workers can score within SYNC_TIMEOUT at full batches: each worker
measures that capacity while it warms up (engine.runtime.measure_capacity), before its first
request, so a burst right after start is not refused for want of a measured pace.
"""

from __future__ import annotations

import math

from engine.cost import Layout, call_cost, layout, pair_cost  # noqa: F401 - pure: no numpy, no torch
from shared.schemas import ScoreOptions
from shared.workers import per_engine

#: What the tokenizer turns one character into, before any worker has measured it.
DEFAULT_CHARS_PER_TOKEN = 3.0
#: Batches computed from length-sorted pairs are about 95 % real tokens (engine/batcher.py).
PADDING_FACTOR = 1.05


def workers_layout(workers: list[dict]) -> Layout:
    """The pair layout the live workers of a model announce (family and template size), from
    which a call is priced; a cross-encoder's when they say nothing."""
    for w in workers:
        if w.get("family"):
            return layout(w["family"], w.get("template_tokens"))
    return layout(None)


def served_length(workers: list[dict], default: int) -> int:
    """Tokens per pair the live workers serve (their heartbeat's context_length): a worker that
    sees a Qwen3 folder serves 8192 even where the API, without the folder, assumed the default."""
    lengths = [int(w["context_length"]) for w in workers if w.get("context_length")]
    return max(lengths) if lengths else default


def estimate_cost(query: str, documents: list[str], options: ScoreOptions, *, max_length: int,
                  chars_per_token: float, max_chunks: int = 64, pair_layout: Layout | None = None) -> int:
    """What a call will cost the batcher, from its text alone: tokens estimated from characters
    at the workers' measured ratio, then priced by engine.cost (the family's truncation and the
    chunking options applied), the arithmetic the batcher itself counts with."""
    def tokens(text: str) -> int:
        return math.ceil(len(text) / chars_per_token)

    total = call_cost(tokens(query), (tokens(d) for d in documents), max_length=max_length,
                      layout=pair_layout or layout(None), max_doc_tokens=options.max_doc_tokens,
                      chunk_overlap=options.chunk_overlap,
                      max_chunks=min(options.max_chunks or max_chunks, max_chunks))
    return max(1, math.ceil(total * PADDING_FACTOR))


def chars_per_token(workers: list[dict]) -> float:
    measured = [w["chars_per_token"] for w in workers if w.get("chars_per_token")]
    return sum(measured) / len(measured) if measured else DEFAULT_CHARS_PER_TOKEN


def capacity(workers: list[dict]) -> float:
    """Cost per second the live engines score at full batches (or faster, when measured so): an
    engine fed by several workers counts once."""
    return sum(max(e.get("capacity") or 0.0, e.get("cost_per_second") or 0.0) for e in per_engine(workers))


def pending_limit(explicit: int | None, workers: list[dict], sync_timeout: float) -> float:
    """MAX_PENDING_TOKENS when set; else what the live workers can score within the timeout."""
    if explicit is not None:
        return explicit
    rate = capacity(workers)
    return rate * sync_timeout if rate > 0 else math.inf


def retry_after(pending: int, workers: list[dict]) -> int:
    """Seconds until the pending work should be done, at the workers' capacity."""
    rate = capacity(workers)
    return max(1, math.ceil(pending / rate)) if rate > 0 else 1
