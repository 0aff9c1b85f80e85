"""The engine as its callers see it: text in, one logit per document out.

Scoring is three steps, and callers use them as they need: `encoder.encode` (text -> packed pair
inputs, in the caller's process, where the tokenizer's Rust threads release the GIL),
`submit`/`run` (pair inputs -> logits, through the batcher) and `merge` (pair logits -> each
document's logit, its best window's when chunked). `score(query, documents, policy)` is the three
in one call (tests, benchmarks, notebooks); the worker calls them apart, because a realtime call
measures its encoding (characters per token) and a bulk piece submits many requests as one.

The batcher runs either in this process (`process=False`: tests, benchmarks) or in an engine
process: a worker's own (`process=True`), or a device's shared one that several workers feed
(`socket=PATH`). The results are the same. Starting an engine loads the model, warms the device
up (CUDA graphs are captured then) and measures its capacity at full batches, so the admission
bound is right from the first request (api/admission.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.batcher import REALTIME, Batcher, BatchStats
from engine.encoding import DocumentPolicy, Encoded, Encoder, best_per_document
from engine.runtime import build_runtime, settle
from engine.scoring import activation


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
    cpu_backend: str = "auto"  # CPU: auto, torch, or openvino for a cross-encoder's encoder (docs/cpu.md)
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def from_settings(cls, settings, spec) -> EngineConfig:
        """The engine of a served model (shared.settings.ModelSpec) under the service's settings."""
        return cls(source=spec.source, max_length=spec.max_length, family=spec.family, template=spec.template,
                   device=settings.device, dtype=settings.dtype,
                   max_batch_tokens=settings.max_batch_tokens, cuda_graphs=settings.cuda_graphs,
                   graph_max_tokens=settings.cuda_graph_max_tokens, sim_profile=settings.sim_profile,
                   torch_threads=settings.torch_threads, torch_compile=settings.torch_compile,
                   cpu_backend=settings.cpu_backend,
                   log_level=settings.log_level, log_json=settings.log_json)


@dataclass
class Scores:
    """One request's answer: a logit per document (its best window's when chunked)."""

    logits: np.ndarray
    input_tokens: int
    chunks: np.ndarray | None = None  # windows per document (chunked requests)
    truncated: np.ndarray | None = None  # document longer than its windows (chunked requests)


class _Local:
    """The batcher in this process: what the engine process runs, without the process."""

    connected = True

    def __init__(self, batcher: Batcher, info: dict[str, Any]) -> None:
        self.batcher = batcher
        self.info = info

    def submit(self, encoded: Encoded, *, priority: int, deadline: float | None = None, tag: str | None = None,
               timed: bool = False):
        return self.batcher.submit(encoded.lengths, encoded.ids, priority=priority, deadline=deadline, tag=tag,
                                   timed=timed)

    def wait_ready(self, timeout: float | None) -> bool:
        return True

    def cancel(self, tag: str) -> None:
        self.batcher.cancel(tag)

    def stop(self) -> None:
        self.batcher.stop()


class Engine:
    def __init__(self, encoder: Encoder, scorer, about: dict[str, Any]) -> None:
        self.encoder = encoder
        self.scorer = scorer
        self._about = about

    @property
    def info(self) -> dict[str, Any]:
        """The engine's description (its process's, current after a reconnect) and the encoder's."""
        return {**self.scorer.info, **self._about}

    @property
    def connected(self) -> bool:
        """Whether requests can be scored now (a shared engine may be restarting)."""
        return self.scorer.connected

    @classmethod
    def start(cls, config: EngineConfig, *, process: bool = False, socket: str | None = None,
              on_batch: Callable[[BatchStats], None] | None = None,
              on_exit: Callable[[str], None] | None = None,
              on_state: Callable[[bool], None] | None = None,
              hello: dict[str, Any] | None = None, wait: float | None = None) -> Engine:
        """An engine in this process, in a process of its own (`process`), or the shared engine
        on `socket` (waiting up to `wait` seconds for it; it is rejoined whenever it restarts)."""
        started = time.perf_counter()
        encoder, config = settle(config)
        if socket is not None:
            from engine.transport import EngineClient

            scorer = EngineClient(socket, hello=hello, on_batch=on_batch, on_state=on_state, reconnect=True)
            scorer.connect(wait)
        elif process:
            from engine.process import EngineProcess

            scorer = EngineProcess(config, on_batch=on_batch, on_exit=on_exit, hello=hello)
            scorer.start()
        else:
            batcher, info = build_runtime(config, on_batch=on_batch)
            scorer = _Local(batcher, info)
        about = dict(max_length=encoder.max_length, limit=encoder.limit, engine_process=process or socket is not None,
                     start_seconds=round(time.perf_counter() - started, 2), **encoder.describe())
        return cls(encoder, scorer, about)

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

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait until a restarting shared engine is back; whether it is."""
        return self.scorer.wait_ready(timeout)

    def stop(self) -> None:
        self.scorer.stop()
