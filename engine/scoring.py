"""From a model's raw score to the relevance a client reads: the activations, by name.

Pure (standard library only) so the API process applies them without loading the engine. Which
activation a model's scores take is its family's decision (`Family.activation`,
engine/families/); every family served today ends in a sigmoid: a cross-encoder's logit,
Qwen3-Reranker's `yes - no` (sigmoid(yes - no) = softmax([no, yes])[yes]), and
bge-reranker-v2-gemma's `Yes` logit, as FlagEmbedding's `normalize=True` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def sigmoid(x: float) -> float:
    """Logistic function, stable for large |x| (FlagEmbedding's `normalize=True`)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def identity(x: float) -> float:
    return float(x)


ACTIVATIONS: dict[str, Callable[[float], float]] = {"sigmoid": sigmoid, "identity": identity}

#: The activation of a model whose family is not known (a worker that has not said yet).
DEFAULT_ACTIVATION = "sigmoid"


def activation(name: str | None = None) -> Callable[[float], float]:
    """The activation called `name` (the default one for None)."""
    try:
        return ACTIVATIONS[name or DEFAULT_ACTIVATION]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; one of {sorted(ACTIVATIONS)}") from None
