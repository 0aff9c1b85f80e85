"""The scoring engine: text in, one logit per document out. No Celery, no Redis, no HTTP.

The data path, in the order of the modules:

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

The worker (worker/) wraps this in Celery; nothing here knows it exists.
"""

from engine.batcher import BULK, REALTIME
from engine.encoding import DocumentPolicy, Encoded, Encoder, InputTooLong
from engine.engine import Engine, EngineConfig, Scores
from engine.errors import EngineError, EngineFailed

__all__ = ["BULK", "REALTIME", "DocumentPolicy", "Encoded", "Encoder", "Engine", "EngineConfig", "EngineError", "EngineFailed",
           "InputTooLong", "Scores"]
