"""Admission that knows the capacity: right after a worker answers ready, a burst it can serve
within SYNC_TIMEOUT gets no 429; offered load beyond its capacity still gets 429 at once.

A model slow enough on the CPU that its capacity, not the tokenizer or the API, bounds the work
(4 layers, hidden 256: a few thousand tokens a second on one thread).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from api.admission import estimate_cost, pending_limit
from rerank.random_model import build_model, documents_of_length
from shared.schemas import ScoreOptions
from shared.workers import WorkerRegistry
from tests.procs import start_api, start_worker, wait_for

pytestmark = pytest.mark.stack

SYNC_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def cold(tmp_path_factory, stack_env, log_dir, tokenizer):
    """A fresh worker of the small model and an API, nothing sent to either yet."""
    path = build_model(tmp_path_factory.mktemp("models") / "small", "small")
    env = dict(stack_env, MODELS=f"small={path}", SYNC_TIMEOUT=str(SYNC_TIMEOUT), TORCH_THREADS="1",
               WORKER_CONCURRENCY="32")
    env.pop("ACCESS_TOKEN")
    worker = start_worker("worker-small", env, log_dir, "small")
    api, url = start_api("api-small", env, log_dir)
    try:
        wait_for(lambda: requests.get(url + "/ready", timeout=2).status_code == 200, 20, "ready")
        yield url, env, worker
    finally:
        api.stop()
        worker.stop()


def fastgpt_call(tokenizer, seed: int) -> dict:
    return {"query": "什么是 rerank?", "documents": documents_of_length(tokenizer, [60] * 20, seed=seed)}


def burst(url: str, bodies: list[dict]) -> list[tuple[int, float]]:
    """Every body sent at once (one client each); (status, seconds) of each answer."""
    def call(body):
        started = time.monotonic()
        r = requests.post(url + "/v1/rerank", json=body, timeout=30)
        return r.status_code, time.monotonic() - started

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(call, bodies))


def limits(env: dict, body: dict) -> tuple[float, int]:
    """The bound the API applies (from the worker's heartbeat) and what one call costs against it."""
    (worker,) = WorkerRegistry(redis.Redis.from_url(env["REDIS_URL"])).alive("small", fresh=True)
    cost = estimate_cost(body["query"], body["documents"], ScoreOptions(), max_length=512,
                         chars_per_token=worker["chars_per_token"])
    return pending_limit(None, [worker], SYNC_TIMEOUT), cost


def test_a_burst_right_after_ready_that_fits_the_capacity_gets_no_429(cold, tokenizer):
    url, env, _ = cold
    bodies = [fastgpt_call(tokenizer, seed) for seed in range(40)]
    limit, cost = limits(env, bodies[0])
    assert limit < float("inf"), "the worker announced its capacity before its first request"
    clients = max(2, min(40, int(0.4 * limit // cost)))  # what it scores in 40 % of SYNC_TIMEOUT
    answers = burst(url, bodies[:clients])
    assert [s for s, _ in answers] == [200] * clients, answers


def test_load_beyond_the_capacity_gets_429_at_once(cold, tokenizer):
    url, env, _ = cold
    bodies = [fastgpt_call(tokenizer, seed) for seed in range(80)]
    limit, cost = limits(env, bodies[0])
    clients = min(80, max(8, int(3 * limit // cost)))  # three times what fits
    answers = burst(url, bodies[:clients])
    refused = [t for s, t in answers if s == 429]
    assert refused, f"{clients} calls costing {clients * cost} against a bound of {limit}: none refused"
    assert max(refused) < 1.5  # at once, not after waiting in a queue
    assert {s for s, _ in answers} <= {200, 429, 504}
    assert sum(1 for s, _ in answers if s == 200) >= 1
