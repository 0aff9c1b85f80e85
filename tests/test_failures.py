"""When parts are missing or die: the API answers 503/504 within its timeout, never hangs or 200s."""

from __future__ import annotations

import signal
import time

import pytest
import requests

from rerank.launch import free_port
from tests.procs import base_env, start_api, start_worker, wait_for

pytestmark = pytest.mark.stack

BODY = {"model": "spare", "query": "q", "documents": ["a", "b"]}


def timed_post(stack, body):
    started = time.monotonic()
    r = stack.post("/v1/rerank", body, token=None)
    return r, time.monotonic() - started


def test_worker_stopped_gracefully_gives_503_at_once(multi_api, log_dir):
    worker = start_worker("worker-spare-graceful", multi_api.env, log_dir, "spare")
    try:
        assert timed_post(multi_api, BODY)[0].status_code == 200
    finally:
        assert worker.stop() == 0  # warm shutdown withdraws the heartbeat
    time.sleep(1.1)  # the API caches worker liveness for a second
    r, took = timed_post(multi_api, BODY)
    assert r.status_code == 503 and took < 2


def test_paused_worker_gives_504_within_the_timeout(multi_api, log_dir):
    worker = start_worker("worker-spare-paused", multi_api.env, log_dir, "spare")
    try:
        worker.signal(signal.SIGSTOP)  # alive to the heartbeat for a moment, but answering nothing
        r, took = timed_post(multi_api, BODY)
        assert r.status_code in (503, 504), r.text
        assert took < 3 + 1.5  # SYNC_TIMEOUT is 3 s here
    finally:
        worker.signal(signal.SIGCONT)
        worker.stop()


def test_killed_worker_gives_503_or_504_within_the_timeout_and_a_new_one_serves(multi_api, log_dir):
    worker = start_worker("worker-spare-killed", multi_api.env, log_dir, "spare")
    worker.signal(signal.SIGKILL)
    worker.stop()
    r, took = timed_post(multi_api, BODY)
    assert r.status_code in (503, 504) and took < 3 + 1.5
    replacement = start_worker("worker-spare-replacement", multi_api.env, log_dir, "spare")
    try:
        r, _ = timed_post(multi_api, BODY)
        assert r.status_code == 200, r.text
    finally:
        replacement.stop()


def test_redis_unreachable_gives_503(stack_env, log_dir):
    env = dict(stack_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    proc, url = start_api("api-no-redis", env, log_dir)
    try:
        started = time.monotonic()
        r = requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["a"]},
                          headers={"Authorization": "Bearer token-one"}, timeout=30)
        assert r.status_code == 503 and "Redis" in r.json()["error"]
        assert time.monotonic() - started < 5
        assert requests.get(url + "/health", timeout=5).status_code == 200
    finally:
        proc.stop()


def test_worker_whose_model_cannot_load_exits_visibly(stack_env, log_dir, tmp_path, redis_url):
    import redis as redis_lib

    env = base_env(**dict(stack_env, MODELS=f"broken={tmp_path}/no-such-model"))
    worker = start_worker("worker-broken", env, log_dir, "broken", wait=False)
    code = wait_for(lambda: worker.popen.poll(), 60, "the broken worker to exit")
    worker.stop()
    assert code == 3
    assert "could not load model broken" in worker.log_tail(200)
    assert redis_lib.Redis.from_url(redis_url).scard("rerank:workers:broken") == 0
