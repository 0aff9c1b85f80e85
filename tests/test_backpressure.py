"""Backpressure: pending realtime work is bounded (429 + Retry-After at once), and work whose
caller gave up is never scored."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
import requests

from api.admission import estimate_cost, pending_limit, retry_after
from shared.schemas import ScoreOptions
from shared.workers import WorkerRegistry
from tests.procs import start_api, start_worker, wait_for

pytestmark = pytest.mark.stack


def test_pending_limit_is_what_the_workers_score_within_the_timeout_at_full_batches():
    # capacity: measured at start on full batches; cost_per_second: the live pace, when higher
    workers = [{"capacity": 1000.0, "cost_per_second": 10.0}, {"capacity": 500.0, "cost_per_second": 800.0}, {}]
    assert pending_limit(None, workers, 20) == (1000 + 800) * 20
    assert pending_limit(7, workers, 20) == 7
    assert pending_limit(None, [{}], 20) == float("inf")  # nothing measured: no bound
    assert retry_after(3600, workers) == 2 and retry_after(1, workers) == 1


def test_cost_estimate_counts_tokens_as_the_batcher_does():
    plain = ScoreOptions()
    one = estimate_cost("q" * 30, ["d" * 300], plain, max_length=512, chars_per_token=3.0)
    assert one == pytest.approx((10 + 100 + 4) * 1.05, abs=1)
    # Long documents are cut at max_length: a huge one costs one full pair, not its length.
    assert estimate_cost("q", ["d" * 10**6], plain, max_length=512, chars_per_token=3.0) == pytest.approx(
        512 * 1.05, abs=1)
    # Chunked, it costs its windows (at most max_chunks); beyond 512 tokens attention is quadratic.
    chunked = ScoreOptions(chunk_overlap=0, max_chunks=64)
    assert estimate_cost("q", ["d" * 3000], chunked, max_length=512, chars_per_token=1.0) == pytest.approx(
        6 * 512 * 1.05, abs=2)
    assert estimate_cost("q", ["d" * 8000], plain, max_length=8192, chars_per_token=1.0) > 8000 * 15
    # Twenty documents cost twenty times one.
    assert estimate_cost("q", ["d" * 90] * 20, plain, max_length=512, chars_per_token=3.0) == pytest.approx(
        20 * estimate_cost("q", ["d" * 90], plain, max_length=512, chars_per_token=3.0), rel=0.01)


def test_over_the_bound_is_429_at_once_and_expired_work_is_not_scored(multi_api, log_dir):
    # Each call below costs about 5 x 7 tokens: two fit under 80, a third does not.
    env = dict(multi_api.env, MAX_PENDING_TOKENS="80", SYNC_TIMEOUT="3")
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
