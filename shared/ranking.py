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
