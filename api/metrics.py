"""The API's own Prometheus metrics, and the /metrics text that adds the cluster's to them.

Under gunicorn several processes serve the API, so metrics go through prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by api/gunicorn.conf.py); run in a single
process (tests, `flask run`) they use the default registry.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

REQUESTS = Counter("rerank_http_requests", "HTTP requests by route, method and status",
                   ["route", "method", "status"])
LATENCY = Histogram("rerank_http_request_seconds", "HTTP request latency by route", ["route", "method"],
                    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60))


def observe(route: str, method: str, status: int, seconds: float) -> None:
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route, method).observe(seconds)


def exposition(cluster_collector) -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        local = generate_latest(registry)
    else:
        local = generate_latest(REGISTRY)
    cluster = CollectorRegistry(auto_describe=False)
    cluster.register(cluster_collector)
    return local + generate_latest(cluster)
