"""Turning logits into the ranked list a client reads: sigmoid, sort, cut. Pure functions.

Done once, after scoring, so realtime calls and bulk jobs rank the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def sigmoid(x: float) -> float:
    """Logistic function, stable for large |x| (FlagEmbedding's `normalize=True`)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def rank(
    logits: Sequence[float],
    *,
    raw_scores: bool = False,
    top_n: int | None = None,
) -> list[tuple[int, float]]:
    """(index, score) pairs sorted high to low, ties in input order, cut to `top_n`."""
    scores = list(logits) if raw_scores else [sigmoid(x) for x in logits]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    return [(i, scores[i]) for i in order]


def shape_results(
    logits: Sequence[float],
    texts: Sequence[str],
    *,
    raw_scores: bool = False,
    top_n: int | None = None,
    return_documents: bool = False,
    chunks: Sequence[int] | None = None,
) -> list[dict[str, object]]:
    """The `results` list of a rerank answer (realtime and bulk alike)."""
    results: list[dict[str, object]] = []
    for i, score in rank(logits, raw_scores=raw_scores, top_n=top_n):
        result: dict[str, object] = {"index": i, "relevance_score": score}
        if return_documents:
            result["document"] = {"text": texts[i]}
        if chunks is not None:
            result["chunks"] = chunks[i]
        results.append(result)
    return results
