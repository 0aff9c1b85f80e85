"""Turning logits into the ranked list a client reads: sigmoid, sort, cut. Pure functions.

Done once, after scoring, so realtime calls and bulk jobs rank the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shared.schemas import RerankResult, RerankResultDocument, ScoreOptions, Scored


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


def ranked_results(
    logits: Sequence[float],
    texts: Sequence[str],
    *,
    raw_scores: bool = False,
    top_n: int | None = None,
    return_documents: bool = False,
    chunks: Sequence[int] | None = None,
    truncated: Sequence[bool] | None = None,
) -> list[RerankResult]:
    """The `results` list of a rerank answer (Cohere v1 and v2, Jina; realtime and bulk alike)."""
    return [
        RerankResult(
            index=i,
            relevance_score=score,
            document=RerankResultDocument(text=texts[i]) if return_documents else None,
            chunks=chunks[i] if chunks is not None else None,
            truncated=bool(truncated[i]) if truncated is not None else None,
        )
        for i, score in rank(logits, raw_scores=raw_scores, top_n=top_n)
    ]


def results_of(scored: Scored, texts: Sequence[str], options: ScoreOptions, top_n: int | None = None
               ) -> list[RerankResult]:
    """`ranked_results` for one call's scores and its resolved options: how the realtime routes
    and bulk pieces alike turn a Scored into results, so the same options rank the same way."""
    return ranked_results(
        scored.logits, texts, raw_scores=options.raw_scores, top_n=top_n, return_documents=options.return_documents,
        chunks=scored.windows() if options.return_chunks else None,
        truncated=scored.cut() if options.return_chunks else None,
    )
