"""Backpressure: pending realtime work is bounded (429 + Retry-After at once), and work whose
caller gave up is never scored."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
import requests

from api.admission import pending_limit, retry_after
from shared.workers import WorkerRegistry
from tests.procs import start_api, start_worker, wait_for

pytestmark = pytest.mark.stack


def test_pending_limit_follows_measured_capacity():
    workers = [{"pairs_per_second": 100.0}, {"pairs_per_second": 50.0}, {}]
    assert pending_limit(None, workers, 20) == 150 * 20 * 0.75
    assert pending_limit(7, workers, 20) == 7
    assert pending_limit(None, [{}], 20) == float("inf")  # nothing measured yet: no bound
    assert retry_after(300, workers) == 2 and retry_after(1, workers) == 1


def test_over_the_bound_is_429_at_once_and_expired_work_is_not_scored(multi_api, log_dir):
    env = dict(multi_api.env, MAX_PENDING_PAIRS="10", SYNC_TIMEOUT="3")
    api, url = start_api("api-bounded", env, log_dir)
    worker = start_worker("worker-spare-bp", env, log_dir, "spare")
    try:
        worker.signal(signal.SIGSTOP)  # nothing gets scored: admitted calls stay pending
        results = {}

        def call(name):
            r = requests.post(url + "/v1/rerank", timeout=30, headers={"X-Request-Id": f"bp-{name}"},
                              json={"model": "spare", "query": "q", "documents": ["d"] * 5})
            results[name] = r.status_code

        waiting = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
        for t in waiting:
            t.start()
        time.sleep(0.5)
        started = time.monotonic()
        r = requests.post(url + "/v1/rerank", json={"model": "spare", "query": "q", "documents": ["d"] * 5},
                          timeout=30)
        assert r.status_code == 429, r.text
        assert time.monotonic() - started < 1
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error_type"] == "overloaded"
        for t in waiting:
            t.join()
        assert set(results.values()) <= {503, 504} and len(results) == 2  # the worker looks dead or slow
        worker.signal(signal.SIGCONT)
        client = redis.Redis.from_url(env["REDIS_URL"])
        wait_for(lambda: WorkerRegistry(client).alive("spare", fresh=True), 10, "the heartbeat")
        time.sleep(1.1)  # the API's cache of worker liveness
        # The pending pairs were released when the callers gave up: room again.
        r = requests.post(url + "/v1/rerank", json={"model": "spare", "query": "q", "documents": ["d"] * 5},
                          timeout=30)
        assert r.status_code == 200, r.text
    finally:
        worker.signal(signal.SIGCONT)
        worker.stop()
        api.stop()
    log = worker.log_tail(400)
    for name in ("a", "b"):  # the worker saw the expired calls and discarded them unscored
        lines = [line for line in log.splitlines() if f"bp-{name}" in line]
        assert any("dropped" in line or "Discarding" in line for line in lines), lines
