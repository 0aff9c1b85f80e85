"""Scoring as a plain function: (pairs, settings) -> scores, with no server around it.

The same steps the worker runs (encode, sort by length, batch by token budget, forward, put back
in input order), called in-process. Benchmarks use it as the ceiling; tests compare it with
sentence-transformers' CrossEncoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.ranking import sigmoid
from worker.batching import plan_batches
from worker.model import Reranker


@dataclass(frozen=True)
class ScoringSettings:
    max_length: int | None = None  # None: the model's configured max_length
    max_batch_tokens: int = 16384
    normalize: bool = True  # sigmoid (FlagEmbedding normalize=True); False gives logits


def default_batch_tokens(device_type: str) -> int:
    """Padded tokens per forward pass: big enough to fill a GPU; on CPU, small batches stay in
    cache and run faster (2048 beat 8192 by 20-25 % for base and small models on 2 cores)."""
    return 65536 if device_type == "cuda" else 2048


def encode_pairs(
    reranker: Reranker, pairs: Sequence[tuple[str, str]], max_length: int | None = None
) -> list[list[int]]:
    """Token ids of each pair; each distinct query is tokenized once."""
    by_query: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        by_query.setdefault(query, []).append(i)
    encoded: list[list[int]] = [[] for _ in pairs]
    for query, indices in by_query.items():
        seqs = reranker.encode(query, [pairs[i][1] for i in indices], max_length)
        for i, seq in zip(indices, seqs):
            encoded[i] = seq
    return encoded


def score_encoded(
    reranker: Reranker, encoded: Sequence[Sequence[int]], max_batch_tokens: int
) -> list[float]:
    """Logits of encoded pairs, in input order."""
    logits: list[float] = [0.0] * len(encoded)
    for batch in plan_batches([len(s) for s in encoded], max_batch_tokens):
        for i, value in zip(batch, reranker.forward([encoded[i] for i in batch])):
            logits[i] = value
    return logits


def score_pairs(
    reranker: Reranker,
    pairs: Sequence[tuple[str, str]],
    settings: ScoringSettings = ScoringSettings(),
) -> list[float]:
    """Relevance of each (query, document) pair: sigmoid scores, or logits if not `normalize`."""
    encoded = encode_pairs(reranker, pairs, settings.max_length)
    logits = score_encoded(reranker, encoded, settings.max_batch_tokens)
    return [sigmoid(x) for x in logits] if settings.normalize else logits


# --- long documents: truncation direction, token caps, best-chunk scoring ------------------------


class InputTooLong(ValueError):
    """A pair is longer than max_length and truncation was refused (TEI's `truncate: false`)."""


@dataclass(frozen=True)
class DocumentPolicy:
    """How a document becomes pair inputs when it does not fit (defaults: FlagEmbedding's)."""

    direction: str = "right"  # which end to keep when cutting: "right" keeps the start (TEI)
    max_doc_tokens: int | None = None  # Cohere v2 max_tokens_per_doc: cut the document first
    chunk_overlap: int | None = None  # set: score every window, keep the best (Cohere chunks)
    max_chunks: int = 64
    truncate: bool = True  # False: a pair longer than max_length is an error

    @property
    def plain(self) -> bool:
        return (self.direction == "right" and self.max_doc_tokens is None and self.chunk_overlap is None
                and self.truncate)


def document_policy(options) -> DocumentPolicy:
    """The policy a task's ScoreOptions (shared/schemas.py) asks for."""
    return DocumentPolicy(direction=options.direction, max_doc_tokens=options.max_doc_tokens,
                          chunk_overlap=options.chunk_overlap, max_chunks=options.max_chunks,
                          truncate=options.truncate)


def windows(tokens: Sequence[int], size: int, overlap: int, max_chunks: int, direction: str) -> list[list[int]]:
    """Windows of `size` tokens that overlap by `overlap` and cover `tokens` (at most max_chunks:
    the first ones, or the last ones when cutting from the left)."""
    if len(tokens) <= size:
        return [list(tokens)]
    overlap = min(overlap, size // 2)
    step = size - overlap
    starts = list(range(0, len(tokens) - overlap, step))
    if starts and starts[-1] + size > len(tokens):
        starts[-1] = len(tokens) - size  # the last window ends on the last token
    starts = sorted(set(starts))
    starts = starts[-max_chunks:] if direction == "left" else starts[:max_chunks]
    return [list(tokens[s : s + size]) for s in starts]


def encode_documents(
    reranker: Reranker, query: str, documents: Sequence[str], max_length: int | None, policy: DocumentPolicy
) -> tuple[list[list[int]], list[int]]:
    """Pair inputs and, for each, the index of its document (several when a document is chunked)."""
    if policy.plain:
        encoded = reranker.encode(query, documents, max_length)
        return encoded, list(range(len(encoded)))
    max_length = min(max_length or reranker.max_length, reranker.limit)
    q_ids = reranker.query_ids(query, max_length)
    room = reranker.room(q_ids, max_length)
    docs = reranker.tokenizer(list(documents), add_special_tokens=False)["input_ids"] if documents else []
    sequences, owners = [], []
    for index, d in enumerate(docs):
        if policy.max_doc_tokens is not None and len(d) > policy.max_doc_tokens:
            d = d[-policy.max_doc_tokens :] if policy.direction == "left" else d[: policy.max_doc_tokens]
        if len(d) > room and not policy.truncate and policy.chunk_overlap is None:
            total = len(d) + len(q_ids) + reranker.specials
            raise InputTooLong(f"document {index} makes a pair of {total} tokens; at most {max_length}")
        if policy.chunk_overlap is not None:
            parts = windows(d, room, policy.chunk_overlap, policy.max_chunks, policy.direction)
        else:
            parts = [d[-room:] if policy.direction == "left" else d[:room]]
        for part in parts:
            sequences.append(reranker.pair(q_ids, part))
            owners.append(index)
    return sequences, owners


def best_per_document(logits: Sequence[float], owners: Sequence[int], count: int) -> tuple[list[float], list[int]]:
    """Each document's best window logit, and how many windows it had."""
    best = [float("-inf")] * count
    chunks = [0] * count
    for value, owner in zip(logits, owners):
        best[owner] = max(best[owner], value)
        chunks[owner] += 1
    return best, chunks
