"""The scoring engine: text in, one score per document out. No Celery, no Redis, no HTTP.

The data path, in the order of the modules:

    families   how a model family turns a pair into tokens (template, truncation), lays out a
               batch, which output is the score and how it is normalised: cross-encoders
               (bge), Qwen3-Reranker (yes/no), bge-reranker-v2-gemma (Yes); one module each
    encoding   text -> pair inputs (FlagEmbedding's layout and truncation, windows for long
               documents) as packed int32 arrays; and back: each document's best window
    batcher    pair inputs of many requests -> forward passes under a token budget,
               realtime before bulk, longest items together, deadlines and cancels honoured
    backends   one padded batch -> logits: torch eager (CPU, CUDA), CUDA graph replay, and a
               simulated GPU for seeing the GPU path on a CPU machine
    runtime    what an engine runs before it serves: the model loaded, warmed up, its
               capacity measured
    transport  feeders <-> engine over a Unix socket: packed arrays, several feeders per
               engine, reconnection when a shared engine restarts
    process    the batcher and its backend in a process of their own (a device's shared
               engine, or a worker's own), so nothing else the workers do (Celery, JSON,
               tokenizing) competes with the model for one GIL
    engine     `Engine`: encode, run, merge (and `score`, the three in one call), in this
               process or through an engine process, with the same results
    errors     every error the engine raises, one type per layer
    cost, scoring   pure arithmetic (what a batch costs; the activations), imported by the API too

The worker (worker/) wraps this in Celery; nothing here knows it exists. Names are imported on
first use, so the API can import the pure modules (engine.cost, engine.scoring) without numpy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BULK": "engine.batcher", "REALTIME": "engine.batcher",
    "DocumentPolicy": "engine.encoding", "Encoded": "engine.encoding", "Encoder": "engine.encoding",
    "InputTooLong": "engine.errors", "InstructionNotAccepted": "engine.errors",
    "Engine": "engine.engine", "EngineConfig": "engine.engine", "Scores": "engine.engine",
    "EngineError": "engine.errors", "EngineFailed": "engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
