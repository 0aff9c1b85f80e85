"""The part of /metrics that lives in Redis: queues, pending work and its bound, live workers, bulk
work in flight, whether Redis takes writes, and the metric snapshots the workers publish with
their heartbeats. Read at scrape time by the API; deploy/grafana and deploy/prometheus read these.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import redis
from prometheus_client.core import GaugeMetricFamily, Metric

from shared import names, redis_state
from shared.settings import Settings
from shared.workers import WorkerRegistry


#: Every state shared/redis_state.py can name: each is a series of rerank_redis_state (0 or 1).
REDIS_STATES = (redis_state.OK, redis_state.UNREACHABLE, redis_state.CANNOT_WRITE, redis_state.OUT_OF_MEMORY,
                redis_state.READ_ONLY, redis_state.REFUSED, redis_state.FAILING_OVER)


class ClusterCollector:
    def __init__(self, client: redis.Redis, settings: Settings,
                 limit: Callable[[list[dict]], float] | None = None) -> None:
        """`limit`: the admission bound (pending padded tokens) for a model's live workers."""
        self._redis = client
        self._settings = settings
        self._workers = WorkerRegistry(client)
        self._limit = limit

    def collect(self):
        models = [spec.name for spec in self._settings.served_models]
        workers = GaugeMetricFamily("rerank_workers", "Live workers per model", labels=["model"])
        depth = GaugeMetricFamily("rerank_queue_depth", "Tasks waiting in a queue", labels=["model", "queue"])
        pending = GaugeMetricFamily("rerank_pending_tokens",
                                    "Realtime work admitted, not yet answered (padded tokens)", labels=["model"])
        bound = GaugeMetricFamily("rerank_pending_tokens_limit",
                                  "The bound on rerank_pending_tokens past which calls get 429 (+Inf: none yet)",
                                  labels=["model"])
        in_flight = GaugeMetricFamily("rerank_job_pieces_in_flight",
                                      "Bulk job pieces handed to the workers and not yet ended", labels=["model"])
        waiting = GaugeMetricFamily("rerank_jobs_waiting",
                                    "Bulk jobs with pieces not yet handed to the workers", labels=["model"])
        state = redis_state.probe(self._redis)  # a tiny write: PING passes while writes are refused
        states = GaugeMetricFamily("rerank_redis_state", "1 for the state Redis is in (shared/redis_state.py)",
                                   labels=["state"])
        for name in REDIS_STATES:
            states.add_metric([name], 1 if state.state == name else 0)
        yield states
        snapshots: list[tuple[str, list[dict]]] = []
        try:
            for model in models:
                alive = self._workers.alive(model, fresh=True)
                workers.add_metric([model], len(alive))
                feed = names.feed_keys(model)
                pipe = self._redis.pipeline()
                pipe.llen(names.realtime_list(model))  # the direct path's calls
                pipe.llen(names.realtime_queue(model))  # Celery's (REALTIME_PATH=celery)
                pipe.llen(names.bulk_queue(model))
                pipe.get(names.pending_keys(model).total)
                pipe.zcard(feed.inflight)
                pipe.zrange(feed.owners, 0, -1)
                direct, realtime, bulk, total, pieces, owners = pipe.execute()
                depth.add_metric([model, "realtime"], direct + realtime)
                depth.add_metric([model, "bulk"], bulk)
                pending.add_metric([model], int(total or 0))
                if self._limit is not None:
                    bound.add_metric([model], float(self._limit(alive)))
                in_flight.add_metric([model], pieces)
                pipe = self._redis.pipeline()
                for owner in owners:
                    pipe.zcard(names.feed_owner_key(model, owner.decode()))
                waiting.add_metric([model], sum(pipe.execute()) if owners else 0)
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
        yield from (up, workers, depth, pending, bound, in_flight, waiting)
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
