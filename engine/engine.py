"""`Engine.score(query, documents, policy)`: the one entry point of the scoring path.

Realtime calls, bulk pieces, the benchmarks and the tests all score through it. The engine
encodes in the caller's process (encoding.py) and scores either in this process (a batcher
thread: tests, benchmarks, notebooks) or in an engine process of its own (`process=True`: the
worker), with the same results. Starting it loads the model, warms the device up (CUDA graphs
are captured then) and measures its capacity at full batches, so the admission bound is right
from the first request (api/admission.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.backends import PaddedBatch, default_batch_tokens, forward, load_backend
from engine import families
from engine.batcher import REALTIME, Batcher, BatchStats
from engine.cost import padded_cost
from engine.encoding import DocumentPolicy, Encoded, Encoder, best_per_document
from engine.scoring import activation

log = logging.getLogger(__name__)

#: How long the capacity measurement may take at start (at least one full-budget pass is timed).
CAPACITY_SECONDS = 2.0


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to start; the worker fills it from the settings (shared/settings.py)."""

    source: str  # Hugging Face id or local folder
    max_length: int | None = None  # None: the family's default context (512 cross-encoder, 8192 Qwen3)
    family: str | None = None  # engine/families/; None: the one config.json implies
    template: Mapping[str, str] | None = None  # the family's prompt strings overridden (JSON MODELS)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, or sim (a simulated H100)
    dtype: str = "auto"
    max_batch_tokens: int | None = None  # None: by device (backends.default_batch_tokens)
    cuda_graphs: bool = True
    graph_max_tokens: int = 8192
    sim_profile: str | None = None  # base, large or v2-m3; None: the one matching the model
    torch_threads: int | None = None
    torch_compile: bool = False  # CPU: torch.compile (inductor) at warm-up, eager if it fails (docs/cpu.md)
    log_level: str = "INFO"
    log_json: bool = False


@dataclass
class Scores:
    """One request's answer: a logit per document (its best window's when chunked)."""

    logits: np.ndarray
    input_tokens: int
    chunks: np.ndarray | None = None  # windows per document (chunked requests)
    truncated: np.ndarray | None = None  # document longer than its windows (chunked requests)


class _Local:
    """The batcher in this process: what the engine process runs, without the process."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def submit(self, encoded: Encoded, *, priority: int, deadline: float | None = None, tag: str | None = None,
               timed: bool = False):
        return self.batcher.submit(encoded.lengths, encoded.ids, priority=priority, deadline=deadline, tag=tag,
                                   timed=timed)

    def cancel(self, tag: str) -> None:
        self.batcher.cancel(tag)

    def stop(self) -> None:
        self.batcher.stop()


class Engine:
    def __init__(self, encoder: Encoder, scorer, info: dict[str, Any]) -> None:
        self.encoder = encoder
        self.scorer = scorer
        self.info = info

    @classmethod
    def start(cls, config: EngineConfig, *, process: bool = False,
              on_batch: Callable[[BatchStats], None] | None = None,
              on_exit: Callable[[str], None] | None = None) -> Engine:
        started = time.perf_counter()
        family = families.family_of(config.source, config.family)
        encoder = family.encoder(config.source, config.max_length, config.template)
        # The backend and the batcher see the family and the context length the encoder settled on.
        config = dataclasses.replace(config, family=family.NAME, max_length=encoder.max_length)
        if process:
            from engine.process import EngineProcess

            scorer = EngineProcess(config, on_batch=on_batch, on_exit=on_exit)
            info = scorer.start()
        else:
            batcher, info = build_runtime(config, on_batch=on_batch)
            scorer = _Local(batcher)
        info.update(max_length=encoder.max_length, limit=encoder.limit, engine_process=process,
                    start_seconds=round(time.perf_counter() - started, 2), **encoder.describe())
        return cls(encoder, scorer, info)

    # --- scoring -----------------------------------------------------------------------------------------------
    def score(self, query: str, documents: Sequence[str], policy: DocumentPolicy = DocumentPolicy(), *,
              priority: int = REALTIME, deadline: float | None = None, tag: str | None = None,
              timeout: float | None = None, instruction: str | None = None) -> Scores:
        """Each document's raw score for the query (the family's activation is the caller's:
        shared/ranking.py). `instruction` None: the model's default; a family that takes none
        raises InstructionNotAccepted for any other."""
        encoded = self.encoder.encode(query, documents, policy, instruction=instruction)
        return self.merge(encoded, self.run(encoded, priority=priority, deadline=deadline, tag=tag, timeout=timeout))

    def run(self, encoded: Encoded, *, priority: int = REALTIME, deadline: float | None = None,
            tag: str | None = None, timeout: float | None = None) -> np.ndarray:
        """Logits of encoded pair inputs, in their order (Expired after `timeout` seconds)."""
        return self.submit(encoded, priority=priority, deadline=deadline, tag=tag).wait(timeout)

    def submit(self, encoded: Encoded, *, priority: int = REALTIME, deadline: float | None = None,
               tag: str | None = None, timed: bool = False):
        """Queue encoded pair inputs; the returned handle's `wait(timeout)` gives their logits, and
        with `timed` its `timings` say when its batches ran (engine.batcher.Timings, for traces)."""
        return self.scorer.submit(encoded, priority=priority, deadline=deadline, tag=tag, timed=timed)

    @staticmethod
    def merge(encoded: Encoded, logits: np.ndarray) -> Scores:
        """Pair logits -> document logits (the best window of a chunked document)."""
        if encoded.truncated is None:
            return Scores(logits=np.asarray(logits, dtype=np.float64), input_tokens=encoded.tokens)
        best, chunks = best_per_document(logits, encoded)
        return Scores(logits=best, input_tokens=encoded.tokens, chunks=chunks, truncated=encoded.truncated)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], *, normalize: bool = True) -> list[float]:
        """Relevance of each (query, document) pair, like sentence-transformers' CrossEncoder.predict:
        the family's activation of the scores (in [0, 1]), or the raw scores if not `normalize`."""
        encoded, where = self.encoder.encode_pairs(pairs)
        logits = self.run(encoded)[where].tolist()
        return [activation(self.encoder.activation)(x) for x in logits] if normalize else logits

    def cancel(self, tag: str) -> None:
        """Drop every queued pair of requests tagged `tag` (a cancelled bulk job)."""
        self.scorer.cancel(tag)

    def stop(self) -> None:
        self.scorer.stop()


# --- what the engine process (or the local batcher) runs ----------------------------------------------------


def configure_child(config: EngineConfig) -> None:
    """Logging and CPU threads of an engine process, before torch loads."""
    from shared.logs import setup_logging

    setup_logging(config.log_level, config.log_json)
    # OpenMP threads spin for ~300k iterations after each parallel region by default; on a CPU
    # worker sharing its cores with the worker process, Redis and often the API, that spinning
    # steals the CPU the reply path needs: 10k spins cut 3-4 ms off a 1-document call on 2
    # cores and left model speed unchanged. Must be set before torch loads libgomp.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    if config.torch_threads and config.device != "sim":
        import torch

        torch.set_num_threads(config.torch_threads)


#: Entries each of the two per-shape kernel caches of torch's oneDNN path keeps (docs/cpu.md,
#: "Memory under varied load"): about half a MiB each, so both together stay under ~64 MiB.
KERNEL_CACHE_ENTRIES = "64"


def bound_kernel_caches() -> None:
    """Bound the caches that grow with the number of batch shapes on a CPU's bf16 path.

    bf16 matrix multiplications go through oneDNN, which builds a kernel per input shape (rows x
    width varies with every batch: hundreds of shapes) and keeps it in two caches of 1024 entries
    by default: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's
    (`LRU_CACHE_CAPACITY`). Full, they held about 860 MiB on the tiny model (bench/cpu_memory.py):
    a plateau, not a leak, but more than a small box should give. Both read their variable when
    first used, so this works even after torch is imported, as long as no bf16 matmul ran yet;
    a value set in the environment wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)
    os.environ.setdefault("LRU_CACHE_CAPACITY", KERNEL_CACHE_ENTRIES)


def build_runtime(config: EngineConfig, *, on_batch: Callable[[BatchStats], None] | None = None
                  ) -> tuple[Batcher, dict[str, Any]]:
    """Load the backend, warm it up, measure its capacity, start the batcher."""
    started = time.perf_counter()
    bound_kernel_caches()
    backend = load_backend(config)
    info = backend.describe()
    budget = config.max_batch_tokens or default_batch_tokens(str(info["device"]).split(":")[0])
    backend.warm_up(budget)
    info = backend.describe()  # after warm-up: graphs captured, their memory known
    capacity = measure_capacity(backend, budget, config.max_length)
    info.update(max_batch_tokens=budget, capacity=round(capacity, 1),
                warm_up_seconds=round(time.perf_counter() - started, 2))
    log.info("engine ready: %s on %s (%s, %s: %s), %d tokens per batch, capacity %.0f tokens/s at full batches",
             config.source, info["device"], info.get("backend"), info["dtype"], info.get("dtype_reason") or "as configured",
             budget, capacity)
    return Batcher(backend, max_batch_tokens=budget, on_batch=on_batch).start(), info


def measure_capacity(backend, budget: int, max_length: int, seconds: float = CAPACITY_SECONDS) -> float:
    """Padded-token cost the device scores per second at full batches.

    Timed on full-budget passes while the worker warms up, so a worker announces what it can do
    before its first request: measured on small first calls instead, the pace looks tiny and the
    admission bound refuses a burst it could serve (docs/gpu.md#cold-start-and-the-admission-bound).
    """
    width = max(8, min(256, max_length))
    rows = max(1, int(budget // padded_cost(1, width)))
    rng = np.random.default_rng(0)
    batch = PaddedBatch(ids=rng.integers(5, 1000, size=(rows, width)).astype(np.int64),
                        lengths=np.full(rows, width, dtype=np.int32))
    forward(backend, batch)  # first pass: allocator and kernels warm
    passes, started = 0, time.perf_counter()
    while passes < 3 and (passes == 0 or time.perf_counter() - started < seconds):
        forward(backend, batch)
        passes += 1
    return padded_cost(rows, width) * passes / (time.perf_counter() - started)



