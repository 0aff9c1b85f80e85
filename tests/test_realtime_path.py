"""The direct path of synchronous calls (worker/realtime_consumer.py): a Redis list, not Celery.

Against a real Redis and real worker processes: calls go that way by default, REALTIME_PATH=celery
still works, a malformed message is answered or dropped without harm, and a call held by a worker
that dies is handed to a live one (shared/redelivery.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import redis
import requests

from shared import names
from shared.redelivery import Redelivery
from shared.workers import WorkerRegistry
from tests.procs import start_api, start_worker, wait_for

pytestmark = pytest.mark.stack

BODY = {"model": "tiny", "query": "where is the queue", "documents": ["in redis", "bananas", "a third"]}


def test_a_dead_workers_held_calls_go_back_to_their_list(redis_url):
    client = redis.Redis.from_url(redis_url)
    dead, live = f"dead-{os.getpid()}", f"live-{os.getpid()}"
    target = names.realtime_list(f"claimed-{os.getpid()}")
    held = names.realtime_held_key(dead)
    try:
        Redelivery(client, dead, 1.0).takes_realtime(target)
        client.zadd(names.holders_key(), {dead: int(client.time()[0]) - 60})  # its last heartbeat: a minute ago
        client.lpush(held, b"first", b"second")  # BLMOVE puts each call it takes on the left
        client.rpush(target, b"queued")

        ids, tags, calls = Redelivery(client, live, 1.0).claim_dead()
        assert dead in ids and calls == 2 and tags == []
        # Back at the end calls are taken from (BLMOVE … RIGHT), the oldest first, before what was queued.
        assert [client.rpop(target) for _ in range(3)] == [b"first", b"second", b"queued"]
        assert not client.exists(held) and not client.hexists(names.realtime_lists_key(), dead)
        assert Redelivery(client, live, 1.0).claim_dead()[2] == 0  # claimed once, whoever asks
    finally:
        client.delete(held, target)
        client.zrem(names.holders_key(), dead)
        client.hdel(names.realtime_lists_key(), dead)


def test_calls_take_the_direct_path_and_the_celery_path_still_works(api, stack_env, log_dir):
    client = redis.Redis.from_url(stack_env["REDIS_URL"])
    (info,) = WorkerRegistry(client).alive("tiny", fresh=True)
    assert info["realtime_direct"] is True  # what the API reads before sending a call that way
    token = stack_env["ACCESS_TOKEN"].split(",")[0]
    direct = path_taken(client, info, lambda: requests.post(api.url + "/v1/rerank", json=BODY, timeout=30,
                                                            headers={"Authorization": f"Bearer {token}"}))
    assert direct[0] == "direct" and direct[1].status_code == 200, direct[1].text

    proc, url = start_api("api-celery-path", dict(stack_env, REALTIME_PATH="celery"), log_dir)
    try:
        celery = path_taken(client, info, lambda: requests.post(url + "/v1/rerank", json=BODY, timeout=30,
                                                                headers={"Authorization": f"Bearer {token}"}))
    finally:
        proc.stop()
    assert celery[0] == "celery" and celery[1].status_code == 200, celery[1].text
    assert celery[1].json()["results"] == direct[1].json()["results"]  # the same worker, the same scores


def path_taken(client: redis.Redis, info: dict, send) -> tuple[str, requests.Response]:
    """Which way a call reached the worker, and its answer: the worker's engine is paused while
    the call is sent, so the call is seen held, on the worker's direct-path list or in kombu's
    record of unacknowledged Celery messages."""
    held = names.realtime_held_key(info["id"])
    unacked = client.hlen(names.KOMBU_UNACKED)
    os.kill(info["engine_pid"], signal.SIGSTOP)
    answer: list[requests.Response] = []
    caller = threading.Thread(target=lambda: answer.append(send()))
    try:
        caller.start()
        way = wait_for(lambda: "direct" if client.llen(held) else "celery" if client.hlen(names.KOMBU_UNACKED) > unacked
                       else None, 10, "the call to reach the worker")
    finally:
        os.kill(info["engine_pid"], signal.SIGCONT)
        caller.join(30)
    return way, answer[0]


def test_a_malformed_call_is_answered_or_dropped_and_the_worker_lives_on(api, stack_env):
    client = redis.Redis.from_url(stack_env["REDIS_URL"])
    call_id = f"malformed.{os.getpid()}"
    client.lpush(names.realtime_list("tiny"), b"not json at all")
    client.lpush(names.realtime_list("tiny"), json.dumps({"call_id": call_id, "documents": 3}))
    item = client.blpop([names.reply_key(call_id)], timeout=10)
    assert item is not None, "the worker did not answer a malformed call whose id it could read"
    assert json.loads(item[1])["failure"]["kind"] == "scoring_failed"
    (info,) = WorkerRegistry(client).alive("tiny", fresh=True)
    wait_for(lambda: not client.exists(names.realtime_held_key(info["id"])), 5, "the held list emptied")
    r = api.post("/v1/rerank", BODY)
    assert r.status_code == 200, r.text


def test_a_call_held_by_a_worker_that_dies_is_answered_by_another(stack_env, model_dir, log_dir):
    """Nothing accepted is lost: the worker holding the call is killed mid-call, and a live worker's
    reaper hands the call on while its caller still waits."""
    env = dict(stack_env, MODELS=f"held={model_dir}", SYNC_TIMEOUT="20", REDELIVER_AFTER="1.5")
    env.pop("ACCESS_TOKEN")
    client = redis.Redis.from_url(env["REDIS_URL"])
    workers = [start_worker(f"worker-held-{n}", env, log_dir, "held", wait=False) for n in range(2)]
    api_proc, url = start_api("api-held", env, log_dir)
    try:
        registry = WorkerRegistry(client)
        wait_for(lambda: {w["pid"] for w in registry.alive("held", fresh=True)} >= {w.pid for w in workers}, 60,
                 "both workers", workers[0])
        infos = {w["pid"]: w for w in registry.alive("held", fresh=True)}
        engines = [infos[w.pid]["engine_pid"] for w in workers]
        for pid in engines:  # neither can answer: whichever takes the call holds it
            os.kill(pid, signal.SIGSTOP)
        answer: dict[str, requests.Response] = {}
        body = dict(BODY, model="held")
        caller = threading.Thread(target=lambda: answer.setdefault(
            "r", requests.post(url + "/v1/rerank", json=body, timeout=60)))
        caller.start()
        held = {w.pid: names.realtime_held_key(infos[w.pid]["id"]) for w in workers}
        holder = wait_for(lambda: next((w for w in workers if client.llen(held[w.pid])), None), 10, "a worker took it")
        other = next(w for w in workers if w is not holder)
        holder.signal(signal.SIGKILL)  # the worker and its engine: no answer will come from them
        holder.stop()
        os.kill(infos[other.pid]["engine_pid"], signal.SIGCONT)
        started = time.monotonic()
        caller.join(30)
        assert answer["r"].status_code == 200, answer["r"].text
        assert len(answer["r"].json()["results"]) == 3
        assert time.monotonic() - started < 15  # REDELIVER_AFTER, not SYNC_TIMEOUT, decided
        assert not client.exists(held[holder.pid])
    finally:
        for pid in engines:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        api_proc.stop()
        for w in workers:
            w.stop()
