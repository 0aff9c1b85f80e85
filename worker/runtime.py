"""The warm state of one worker process: the model, its batcher, its heartbeat.

Built once, before the Celery consumer starts, so the model is loaded when the worker starts and
never on a first request; a worker whose model fails to load exits before taking any task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from shared import names
from shared.jobs import JobStore
from shared.schemas import ScoreReply, ScoreTask
from shared.settings import ModelSpec, Settings
from shared.storage import JobStorage
from shared.workers import WorkerRegistry
from worker.batching import REALTIME, Batcher, Expired
from worker.metrics import WorkerMetrics
from worker.model import Reranker, load_reranker
from worker.scoring import (
    InputTooLong,
    best_per_document,
    default_batch_tokens,
    document_policy,
    encode_documents,
)

log = logging.getLogger(__name__)

#: How long an answer waits in Redis for its caller, who is normally already blocked on it.
REPLY_TTL_SECONDS = 60


class Pace:
    """Pairs scored per second of model time, over the last few seconds of work.

    Published in the heartbeat; the API bounds pending work by it (backpressure).
    """

    HORIZON_SECONDS = 5.0

    def __init__(self) -> None:
        self._pairs = 0.0
        self._seconds = 0.0
        self._lock = threading.Lock()

    def record(self, pairs: int, seconds: float) -> None:
        decay = math.exp(-seconds / self.HORIZON_SECONDS)
        with self._lock:
            self._pairs = self._pairs * decay + pairs
            self._seconds = self._seconds * decay + seconds

    def pairs_per_second(self) -> float | None:
        with self._lock:
            return round(self._pairs / self._seconds, 2) if self._seconds > 0 else None


@dataclass
class Runtime:
    spec: ModelSpec
    settings: Settings
    reranker: Reranker
    batcher: Batcher
    redis: redis.Redis
    pace: Pace
    metrics: WorkerMetrics
    job_store: JobStore
    job_storage: JobStorage
    on_heartbeat: Callable[[], None] | None = None  # e.g. the bulk gate's re-check
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    _stop: threading.Event = field(default_factory=threading.Event)
    _heartbeat: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def start(cls, spec: ModelSpec, settings: Settings) -> Runtime:
        started = time.perf_counter()
        reranker = load_reranker(
            spec.source, device=settings.device, dtype=settings.dtype, max_length=spec.max_length
        )
        budget = settings.max_batch_tokens or default_batch_tokens(reranker.device.type)
        pace = Pace()
        metrics = WorkerMetrics(spec.name)

        def on_batch(pairs: int, real: int, padded: int, seconds: float) -> None:
            pace.record(pairs, seconds)
            metrics.on_batch(pairs, real, padded, seconds)

        batcher = Batcher(
            reranker.launch,
            collate=reranker.collate,
            finish=reranker.finish,
            max_batch_tokens=budget,
            max_wait=settings.batch_wait_ms / 1000,
            on_batch=on_batch,
        ).start()
        client = redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
        )
        log.info(
            "model %s loaded from %s on %s (%s, max_length %d, batch budget %d tokens) in %.1fs",
            spec.name, spec.source, reranker.device, str(reranker.dtype).removeprefix("torch."),
            reranker.max_length, budget, time.perf_counter() - started,
        )
        return cls(
            spec=spec, settings=settings, reranker=reranker, batcher=batcher, redis=client, pace=pace,
            metrics=metrics,
            job_store=JobStore(client, settings.job_ttl), job_storage=JobStorage(settings.job_storage_url),
        )

    def describe(self) -> dict[str, object]:
        return {
            "id": self.worker_id,
            "model": self.spec.name,
            "source": self.spec.source,
            "max_length": self.reranker.max_length,
            "device": str(self.reranker.device),
            "dtype": str(self.reranker.dtype).removeprefix("torch."),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pairs_per_second": self.pace.pairs_per_second(),
        }

    def start_heartbeat(self) -> None:
        """Announce this worker until `stop`: the API answers 503 at once when none is alive."""
        registry = WorkerRegistry(self.redis)
        interval = self.settings.heartbeat_interval

        def beat() -> None:
            while not self._stop.is_set():
                try:
                    registry.announce(self.spec.name, self.worker_id, self.describe(), ttl=3 * interval)
                    self.redis.set(names.worker_metrics_key(self.worker_id),
                                   json.dumps(self.metrics.snapshot()), px=int(3 * interval * 1000))
                except redis.RedisError as exc:
                    log.warning("heartbeat failed: %s", exc)
                if self.on_heartbeat is not None:
                    self.on_heartbeat()
                self._stop.wait(interval)

        self._heartbeat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            WorkerRegistry(self.redis).withdraw(self.spec.name, self.worker_id)
        except redis.RedisError:
            pass
        self.batcher.stop()

    # --- work ----------------------------------------------------------------------------------
    def score(self, task: ScoreTask) -> ScoreReply | None:
        """Score one synchronous call; None when its caller has already given up."""
        started = time.perf_counter()
        timeout = task.deadline - time.time()
        if timeout <= 0 or not self.redis.hexists(names.pending_keys(self.spec.name)[1], task.call_id):
            return None  # the caller gave up (timeout, or it stopped waiting on a dead-looking worker)
        policy = document_policy(task.options)
        try:
            with self.batcher.incoming():
                sequences, owners = encode_documents(self.reranker, task.query, task.documents, None, policy)
        except InputTooLong as exc:
            return ScoreReply(error=str(exc), status=413)
        ticket = self.batcher.submit(sequences, priority=REALTIME, deadline=task.deadline)
        try:
            logits = ticket.wait(timeout=max(task.deadline - time.time(), 0))
        except Expired:
            return None
        tokens = sum(len(s) for s in sequences)
        log.info("scored %d pairs (%d tokens) in %.1f ms", len(sequences), tokens,
                 (time.perf_counter() - started) * 1000)
        if policy.chunk_overlap is None:
            return ScoreReply(logits=logits, input_tokens=tokens)
        best, chunks = best_per_document(logits, owners, len(task.documents))
        return ScoreReply(logits=best, chunks=chunks, input_tokens=tokens)

    def reply(self, call_id: str, reply: ScoreReply) -> None:
        key = names.reply_key(call_id)
        pipe = self.redis.pipeline()
        pipe.rpush(key, reply.model_dump_json(exclude_none=True))
        pipe.expire(key, REPLY_TTL_SECONDS)
        pipe.execute()


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("worker runtime not started (run the worker with `python -m worker`)")
    return _current
