"""What a worker measures, and how it reaches the API's /metrics and admission bound.

Workers may run on other machines, so they do not serve HTTP: each keeps its Prometheus metrics
in its own registry and publishes a snapshot to Redis with every heartbeat. The API's /metrics
adds them up (shared/cluster_metrics.py); a dead worker's snapshot expires with its heartbeat.
`Pace` and `CharsPerToken` go into the heartbeat itself: the API sizes job pieces by the pace,
and estimates what a call costs, before it is queued, from the characters per token.
"""

from __future__ import annotations

import math
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.batcher import BatchStats

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        r = self.registry
        self.batch_size = Histogram("rerank_batch_size", "Pairs per forward pass", ["model"],
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("rerank_batch_tokens", "Padded tokens (rows x longest) per forward pass",
                                      ["model"], buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("rerank_batch_seconds", "Model time per forward pass", ["model"],
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.pairs = Counter("rerank_pairs_scored", "Pairs scored", ["model"], registry=r)
        self.tokens = Counter("rerank_tokens_scored", "Tokens scored, padding excluded", ["model"], registry=r)
        self.padded = Counter("rerank_tokens_computed", "Tokens computed, padding included", ["model"], registry=r)
        self.forward_cpu = Counter("rerank_forward_cpu_seconds",
                                   "CPU time of the model thread inside forward passes (launch and wait)",
                                   ["model"], registry=r)
        self.tasks = Counter("rerank_worker_tasks", "Tasks a worker finished", ["model", "kind", "outcome"],
                             registry=r)
        self.job_items = Counter("rerank_job_items_scored", "Bulk job items scored and counted (a piece done "
                                 "twice counts once)", ["model"], registry=r)

    def on_batch(self, stats: BatchStats) -> None:
        m = self.model
        self.batch_size.labels(m).observe(stats.pairs)
        self.batch_tokens.labels(m).observe(stats.padded_tokens)
        self.batch_seconds.labels(m).observe(stats.seconds)
        self.pairs.labels(m).inc(stats.pairs)
        self.tokens.labels(m).inc(stats.real_tokens)
        self.padded.labels(m).inc(stats.padded_tokens)
        self.forward_cpu.labels(m).inc(stats.forward_cpu)

    def task_done(self, kind: str, outcome: str) -> None:
        self.tasks.labels(self.model, kind, outcome).inc()

    def job_items_done(self, items: int) -> None:
        self.job_items.labels(self.model).inc(items)

    def snapshot(self) -> list[dict]:
        """Every sample, as plain JSON, for the heartbeat."""
        return [
            {"name": m.name, "type": m.type, "doc": m.documentation,
             "samples": [[s.name, s.labels, s.value] for s in m.samples]}
            for m in self.registry.collect()
        ]


class Pace:
    """Pairs and padded-token cost scored per second of model time, over the last few seconds."""

    HORIZON_SECONDS = 5.0

    def __init__(self) -> None:
        self._pairs = 0.0
        self._cost = 0.0
        self._seconds = 0.0
        self._lock = threading.Lock()

    def record(self, pairs: int, cost: float, seconds: float) -> None:
        decay = math.exp(-seconds / self.HORIZON_SECONDS)
        with self._lock:
            self._pairs = self._pairs * decay + pairs
            self._cost = self._cost * decay + cost
            self._seconds = self._seconds * decay + seconds

    def pairs_per_second(self) -> float | None:
        with self._lock:
            return round(self._pairs / self._seconds, 2) if self._seconds > 0 else None

    def cost_per_second(self) -> float | None:
        with self._lock:
            return round(self._cost / self._seconds, 1) if self._seconds > 0 else None


class CharsPerToken:
    """Characters of text per token the tokenizer produced, weighted towards recent traffic."""

    def __init__(self, initial: float = 3.0, weight: float = 0.05) -> None:
        self.value = initial
        self._weight = weight
        self._seen = False

    def record(self, characters: int, tokens: int) -> None:
        if characters <= 0 or tokens <= 0:
            return
        ratio = characters / tokens
        self.value = ratio if not self._seen else (1 - self._weight) * self.value + self._weight * ratio
        self._seen = True
