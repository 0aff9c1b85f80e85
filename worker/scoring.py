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
    """Padded tokens per forward pass: big enough to fill a GPU, small enough for CPU latency."""
    return 65536 if device_type == "cuda" else 8192


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
