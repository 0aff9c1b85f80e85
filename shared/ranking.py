"""Turning logits into the ranked list a client reads: activation, sort, cut. Pure functions.

Done once, after scoring, so realtime calls and bulk jobs rank the same way. The activation is the
model family's (engine/scoring.py, a pure module: the API imports it without the engine); every
family served today uses a sigmoid, the default.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.scoring import activation as _activation
from engine.scoring import sigmoid  # noqa: F401 - re-exported: one definition, engine/scoring.py
from shared.schemas import RerankResult, RerankResultDocument, ScoreOptions, Scored


def normalise(logits: Sequence[float], *, raw_scores: bool = False, activation: str | None = None) -> list[float]:
    """Scores a client reads: the raw logits, or the family's activation of them."""
    if raw_scores:
        return [float(x) for x in logits]
    f = _activation(activation)
    return [f(x) for x in logits]


def rank(
    logits: Sequence[float],
    *,
    raw_scores: bool = False,
    top_n: int | None = None,
    activation: str | None = None,
) -> list[tuple[int, float]]:
    """(index, score) pairs sorted high to low, ties in input order, cut to `top_n`."""
    scores = normalise(logits, raw_scores=raw_scores, activation=activation)
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
    activation: str | None = None,
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
        for i, score in rank(logits, raw_scores=raw_scores, top_n=top_n, activation=activation)
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
