"""What scoring costs, in the batcher's units: the one definition, shared by the engine and the API.

Pure arithmetic on token counts (standard library only): the API process imports it to price a
call before it is queued (api/admission.py) without loading numpy, torch or the engine; the
batcher prices its batches with the same functions (engine/batcher.py), so the admission bound
and the token budget count alike.

A batch costs its padded tokens (rows x width), scaled by width / 512 beyond 512 tokens because
attention grows with the square of the length. The cost of a token differs by model (a 4B
decoder costs ~15 x a base cross-encoder per token); that difference is not in these units but in
each worker's measured capacity (engine.engine.measure_capacity), which the API divides by.

How a pair is laid out (template tokens around it, how much of the budget the query may take)
belongs to its model family (engine/families/); `LAYOUTS` restates, per family, the two numbers
pricing needs, so the API can price a call without the family's tokenizer. A worker publishes
the exact template size its tokenizer gives (heartbeat `template_tokens`), which wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

#: Width beyond which attention, quadratic in length, outweighs the rest of a forward pass.
ATTENTION_KNEE = 512


def padded_cost(rows: int, width: int) -> float:
    """What a batch costs against MAX_BATCH_TOKENS: its padded tokens (rows x width), scaled by
    width / 512 beyond 512 tokens (v2-m3 at 8192 tokens: one pair counts 131 072, as much as 256
    pairs of 512)."""
    return rows * width * max(1.0, width / ATTENTION_KNEE)


def pair_cost(tokens: int) -> float:
    """A pair's share of a batch's cost (padded_cost of one row)."""
    return padded_cost(1, tokens)


@dataclass(frozen=True)
class Layout:
    """How a family spends max_length: template tokens around each pair, and the share of
    max_length the query may take (None: the query is not cut on its own, only the pair is)."""

    template_tokens: int
    query_share: float | None = 0.75

    def query_tokens(self, tokens: int, max_length: int) -> int:
        """The query's tokens after its own cut (FlagEmbedding: 3/4 of max_length)."""
        if self.query_share is None:
            return min(tokens, max(max_length - self.template_tokens - 1, 0))
        return min(tokens, int(max_length * self.query_share))

    def room(self, query_tokens: int, max_length: int) -> int:
        """Tokens left for the document once the query and the template are in (at least 1)."""
        return max(max_length - query_tokens - self.template_tokens, 1)


def query_cap(max_length: int) -> int:
    """FlagEmbedding's query_max_length: `max_length * 3 // 4` (cross-encoders, gemma)."""
    return max_length * 3 // 4


#: Per family: cross-encoders carry `<s> q </s></s> d </s>`; Qwen3-Reranker its system prefix,
#: instruction text and assistant suffix (about 72 tokens with the real tokenizer and the default
#: instruction; the worker's own count replaces this estimate); bge-reranker-v2-gemma `<bos>`,
#: `A: `, `\n`, `B: ` and, after the budget, `\n` and its fixed prompt (~40 tokens).
LAYOUTS: dict[str, Layout] = {
    "cross-encoder": Layout(template_tokens=4),
    "qwen3": Layout(template_tokens=72, query_share=None),
    "gemma": Layout(template_tokens=44),
}


def layout(family: str | None, template_tokens: int | None = None) -> Layout:
    """The layout of a family (cross-encoder when unknown), with a measured template size."""
    base = LAYOUTS.get(family or "cross-encoder", LAYOUTS["cross-encoder"])
    if template_tokens is None:
        return base
    return Layout(template_tokens=int(template_tokens), query_share=base.query_share)


def windows(length: int, room: int, overlap: int | None, max_chunks: int) -> int:
    """How many windows of `room` tokens a document of `length` tokens is scored in."""
    if overlap is None or length <= room:
        return 1
    step = room - min(overlap, room // 2)
    return min(max_chunks, 1 + math.ceil((length - room) / step))


def call_cost(query_tokens: int, document_tokens: Iterable[int], *, max_length: int, layout: Layout = LAYOUTS["cross-encoder"],
              max_doc_tokens: int | None = None, chunk_overlap: int | None = None, max_chunks: int = 64) -> float:
    """What one (query, documents) call costs the batcher, from token counts: the family's
    truncation, the Cohere cap and the windows of chunked documents applied."""
    q = layout.query_tokens(query_tokens, max_length)
    room = layout.room(q, max_length)
    head = q + layout.template_tokens
    total = 0.0
    for length in document_tokens:
        if max_doc_tokens is not None:
            length = min(length, max_doc_tokens)
        total += windows(length, room, chunk_overlap, max_chunks) * pair_cost(head + min(length, room))
    return total
