"""The scoring engine: text in, one logit per document out. No Celery, no Redis, no HTTP.

The data path, in the order of the modules:

    encoding   text -> pair inputs (FlagEmbedding's layout and truncation, windows for long
               documents) as packed int32 arrays; and back: each document's best window
    batcher    pair inputs of many requests -> forward passes under a token budget,
               realtime before bulk, longest items together, deadlines and cancels honoured
    backends   one padded batch -> logits: torch eager (CPU, CUDA), CUDA graph replay, and a
               simulated GPU for seeing the GPU path on a CPU machine
    process    the batcher and its backend in a process of their own, so nothing else the
               worker does (Celery, JSON, tokenizing) competes with the model for one GIL
    engine     `Engine.score(query, documents, policy)`: the one entry point, used alike by
               realtime calls, bulk pieces, benchmarks and tests

The worker (worker/) wraps this in Celery; nothing here knows it exists.
"""

from engine.batcher import BULK, REALTIME
from engine.encoding import DocumentPolicy, Encoded, Encoder, InputTooLong
from engine.engine import Engine, EngineConfig, Scores

__all__ = ["BULK", "REALTIME", "DocumentPolicy", "Encoded", "Encoder", "Engine", "EngineConfig",
           "InputTooLong", "Scores"]
