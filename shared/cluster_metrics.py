"""The part of /metrics that lives in Redis: queues, pending work, live workers and the metric
snapshots the workers publish with their heartbeats. Read at scrape time by the API.
"""

from __future__ import annotations

import json

import redis
from prometheus_client.core import GaugeMetricFamily, Metric

from shared import names
from shared.settings import Settings
from shared.workers import WorkerRegistry


class ClusterCollector:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self._workers = WorkerRegistry(client)

    def collect(self):
        models = [spec.name for spec in self._settings.served_models]
        workers = GaugeMetricFamily("rerank_workers", "Live workers per model", labels=["model"])
        depth = GaugeMetricFamily("rerank_queue_depth", "Tasks waiting in a queue", labels=["model", "queue"])
        pending = GaugeMetricFamily("rerank_pending_tokens",
                                    "Realtime work admitted, not yet answered (padded tokens)", labels=["model"])
        snapshots: list[tuple[str, list[dict]]] = []
        try:
            for model in models:
                alive = self._workers.alive(model, fresh=True)
                workers.add_metric([model], len(alive))
                pipe = self._redis.pipeline()
                pipe.llen(names.realtime_queue(model))
                pipe.llen(names.bulk_queue(model))
                pipe.get(names.pending_keys(model).total)
                realtime, bulk, total = pipe.execute()
                depth.add_metric([model, "realtime"], realtime)
                depth.add_metric([model, "bulk"], bulk)
                pending.add_metric([model], int(total or 0))
                ids = [w["id"] for w in alive]
                if ids:
                    for wid, raw in zip(ids, self._redis.mget([names.worker_metrics_key(i) for i in ids])):
                        if raw:
                            snapshots.append((wid, json.loads(raw)))
        except redis.RedisError:
            up = GaugeMetricFamily("rerank_redis_up", "Whether Redis answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("rerank_redis_up", "Whether Redis answered this scrape")
        up.add_metric([], 1)
        yield from (up, workers, depth, pending)
        yield from _merge(snapshots)


def _merge(snapshots: list[tuple[str, list[dict]]]):
    """One metric family per name, each sample labelled with the worker that reported it."""
    families: dict[str, Metric] = {}
    for worker_id, families_json in snapshots:
        for fam in families_json:
            metric = families.get(fam["name"])
            if metric is None:
                metric = families[fam["name"]] = Metric(fam["name"], fam["doc"], fam["type"])
            for sample_name, labels, value in fam["samples"]:
                metric.add_sample(sample_name, {**labels, "worker": worker_id}, value)
    return families.values()
