"""What a worker measures, and how it reaches the API's /metrics.

Workers may run on other machines, so they do not serve HTTP: each keeps its Prometheus metrics
in its own registry and publishes a snapshot to Redis with every heartbeat. The API's /metrics
adds them up (shared/cluster_metrics.py); a dead worker's snapshot expires with its heartbeat.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

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
        self.tasks = Counter("rerank_worker_tasks", "Tasks a worker finished", ["model", "kind", "outcome"],
                             registry=r)

    def on_batch(self, pairs: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        m = self.model
        self.batch_size.labels(m).observe(pairs)
        self.batch_tokens.labels(m).observe(padded_tokens)
        self.batch_seconds.labels(m).observe(seconds)
        self.pairs.labels(m).inc(pairs)
        self.tokens.labels(m).inc(real_tokens)
        self.padded.labels(m).inc(padded_tokens)

    def task_done(self, kind: str, outcome: str) -> None:
        self.tasks.labels(self.model, kind, outcome).inc()

    def snapshot(self) -> list[dict]:
        """Every sample, as plain JSON, for the heartbeat."""
        return [
            {"name": m.name, "type": m.type, "doc": m.documentation,
             "samples": [[s.name, s.labels, s.value] for s in m.samples]}
            for m in self.registry.collect()
        ]
