"""Redis Sentinel failover: the master is killed under load and mid-job, and nothing accepted is lost.

A real master, a replica and three Sentinels (tests/sentinel_cluster.py), one Celery worker and
gunicorn, all pointed at the Sentinels (REDIS_URL=sentinel://…). What a failover may do, checked:
- a call in flight gets a 503 or completes, and a completed call's answer is the right one;
- new calls succeed again within seconds of the promotion;
- a job whose 202 was sent finishes with every item, each counted once (the acceptance WAITs for
  the replica; pieces the old master held are handed out again and count once).
Figures are printed (`pytest -s tests/test_failover.py`) and kept in FIGURES.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from rerank.random_model import sentence
from shared import names
from tests.procs import Proc, base_env, redis_for, start_api, start_worker, wait_for
from tests.sentinel_cluster import MASTER_NAME, SentinelCluster

pytestmark = [pytest.mark.stack]

TOKEN = "failover-token"
SYNC_TIMEOUT = 4.0
FIGURES: list[str] = []


def report(line: str) -> None:
    FIGURES.append(line)
    print(f"\n[failover] {line}")


@dataclass
class Failover:
    cluster: SentinelCluster
    env: dict[str, str]
    url: str
    api: Proc
    worker: Proc
    log_dir: Path

    def post(self, path: str, timeout: float = 30, **kw) -> requests.Response:
        return requests.post(self.url + path, headers={"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})},
                             timeout=timeout, **kw)

    def get(self, path: str, timeout: float = 30) -> requests.Response:
        return requests.get(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout)


@pytest.fixture(scope="module")
def failover(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("failover-logs")
    work = tmp_path_factory.mktemp("failover-redis")
    data = tmp_path_factory.mktemp("failover-data")
    cluster = SentinelCluster(log_dir, work)
    fo: Failover | None = None
    worker: Proc | None = None
    try:
        cluster.start()
        env = base_env(REDIS_URL=cluster.url, REDIS_MASTER_NAME=MASTER_NAME, MODELS=f"tiny={model_dir}",
                       ACCESS_TOKEN=TOKEN, SYNC_TIMEOUT=str(SYNC_TIMEOUT), HEARTBEAT_INTERVAL="0.5",
                       VISIBILITY_TIMEOUT="5", REDELIVER_AFTER="3", WORKER_CONCURRENCY="8", JOB_PIECE_PAIRS="40",
                       MAX_PENDING_TOKENS="100000000", TORCH_THREADS="1", DATA_DIR=str(data), LOG_LEVEL="INFO")
        worker = start_worker("failover-worker", env, log_dir, "tiny")
        api, url = start_api("failover-api", env, log_dir)
        fo = Failover(cluster, env, url, api, worker, log_dir)
        yield fo
    finally:
        for proc in ([fo.api, fo.worker] if fo else [worker] if worker else []):  # the worker may be a new one
            started = time.monotonic()
            code = proc.stop()
            print(f"[failover] {proc.name} stopped with {code} in {time.monotonic() - started:.1f}s")
        cluster.stop()


def ranking(body: dict) -> list[tuple[int, float]]:
    return [(r["index"], round(r["relevance_score"], 4)) for r in body["results"]]


class Load:
    """Synchronous callers sending known calls while the master dies; every outcome is kept with
    whether a 200's ranking is the one the same call got before the failover."""

    def __init__(self, fo: Failover, calls: list[dict], expected: list[list[tuple[int, float]]], clients: int = 6):
        self.fo, self.calls, self.expected = fo, calls, expected
        self.outcomes: list[tuple[float, float, int, bool]] = []  # start, end, status, right answer
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(clients)]

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as s:
            s.headers["Authorization"] = f"Bearer {TOKEN}"
            while not self.stop.is_set():
                i = rng.randrange(len(self.calls))
                started = time.monotonic()
                try:
                    r = s.post(self.fo.url + "/v1/rerank", json=self.calls[i], timeout=SYNC_TIMEOUT + 10)
                    status, right = r.status_code, r.status_code != 200 or ranking(r.json()) == self.expected[i]
                except requests.RequestException:
                    status, right = -1, True
                with self.lock:
                    self.outcomes.append((started, time.monotonic(), status, right))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def recovered_at(outcomes: list[tuple[float, float, int, bool]], since: float) -> float:
    """The start of the first call after `since` from which on every call succeeded."""
    after = sorted(o for o in outcomes if o[0] >= since)
    last_bad = max((o[0] for o in after if o[2] != 200), default=None)
    if last_bad is None:
        return since
    return min(o[0] for o in after if o[0] > last_bad)


def test_master_killed_under_load(failover):
    rng = random.Random(7)
    calls = [{"model": "tiny", "query": sentence(rng, 5), "documents": [sentence(rng, 12) for _ in range(8)]}
             for _ in range(16)]
    expected = []
    for call in calls:
        r = failover.post("/v1/rerank", json=call)
        assert r.status_code == 200, r.text
        expected.append(ranking(r.json()))
    with Load(failover, calls, expected) as load:
        time.sleep(2)
        old, killed_at = failover.cluster.kill_master()
        new, promoted_at = failover.cluster.wait_promotion(old)
        wait_for(lambda: any(o[0] > promoted_at and o[2] == 200 for o in load.outcomes), 30, "a call to succeed")
        time.sleep(4)
    before = [o for o in load.outcomes if o[0] < killed_at]
    during = [o for o in load.outcomes if o[0] >= killed_at or o[1] >= killed_at]
    back = recovered_at(load.outcomes, killed_at)
    statuses = Counter(o[2] for o in during)
    wrong = [o for o in load.outcomes if not o[3]]
    failed = [o for o in during if o[2] != 200]
    in_flight = Counter(o[2] for o in load.outcomes if o[0] < killed_at < o[1])
    report(f"kill -9 the master under load (6 callers): {len(before)} calls before, {len(during)} from the kill on, "
           f"statuses {dict(statuses)} (in flight at the kill: {dict(in_flight)}); calls failed: {len(failed)}; "
           f"wrong answers: {len(wrong)}; "
           f"Sentinel promoted the replica {promoted_at - killed_at:.1f} s after the kill; calls all succeed again "
           f"{back - killed_at:.1f} s after the kill ({back - promoted_at:+.1f} s from the promotion); "
           f"slowest failed call {max((o[1] - o[0] for o in failed), default=0):.2f} s")
    assert not wrong
    assert set(statuses) <= {200, 503}, statuses  # a clear 503 or the answer, nothing else
    assert all(o[1] - o[0] < SYNC_TIMEOUT + 3 for o in failed)
    assert any(o[0] > back and o[2] == 200 for o in load.outcomes)  # it serves again, by itself
    assert failover.api.popen.poll() is None and failover.worker.popen.poll() is None
    failover.cluster.rejoin(old)  # the old master comes back as a replica: the next test can fail over again


def submit(fo: Failover, items: int, seed: int) -> requests.Response:
    rng = random.Random(seed)
    lines = [json.dumps({"id": f"{seed}-{i}", "query": sentence(rng, 3), "documents": [sentence(rng, 12) for _ in range(10)]})
             for i in range(items)]
    return fo.post("/v1/rerank/jobs", data="\n".join(lines).encode(), headers={"Content-Type": "application/jsonl"},
                   timeout=30)


def job(fo: Failover, job_id: str) -> dict:
    r = fo.get(f"/v1/rerank/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(fo: Failover, job_id: str, timeout: float = 240) -> dict:
    return wait_for(lambda: (j := job(fo, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                    timeout, f"job {job_id}")


def results(fo: Failover, job_id: str) -> list[dict]:
    r = fo.get(f"/v1/rerank/jobs/{job_id}/results")
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def bulk_outcomes(fo: Failover) -> dict[str, float]:
    """Bulk pieces the worker ended, by outcome (done; redone or skipped-duplicate: handed out again)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(fo.url + "/metrics", timeout=5).text
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rerank_worker_tasks_total" and sample.labels.get("kind") == "bulk":
                counts[sample.labels["outcome"]] += sample.value
    return dict(counts)


def test_master_killed_mid_job(failover):
    big = submit(failover, 240, seed=1)
    assert big.status_code == 202, big.text
    big_id = big.json()["id"]
    wait_for(lambda: job(failover, big_id)["progress"]["items_done"] > 0, 120, "the job to make progress")
    accepted: list[tuple[str, int]] = []
    refused: Counter = Counter()
    stop = threading.Event()

    def submitter() -> None:  # small jobs sent all through the failover
        seed = 100
        while not stop.is_set():
            seed += 1
            try:
                r = submit(failover, 8, seed)
            except requests.RequestException:
                refused["no answer"] += 1
                continue
            if r.status_code == 202:
                accepted.append((r.json()["id"], seed))
            else:
                refused[r.status_code] += 1
            time.sleep(0.05)

    thread = threading.Thread(target=submitter)
    thread.start()
    try:
        time.sleep(1)
        done_before = job(failover, big_id)["progress"]["items_done"]
        old, killed_at = failover.cluster.kill_master()
        _, promoted_at = failover.cluster.wait_promotion(old)
        time.sleep(4)
    finally:
        stop.set()
        thread.join()
    final = wait_job(failover, big_id)
    lines = results(failover, big_id)
    ids = [line["id"] for line in lines]
    small_lost = small_wrong = 0
    for job_id, seed in accepted:
        j = wait_job(failover, job_id)
        got = [line["id"] for line in results(failover, job_id)]
        small_lost += j["status"] != "succeeded" or j["progress"]["items_done"] != 8
        small_wrong += got != [f"{seed}-{i}" for i in range(8)]
    # Nothing stays behind: pieces the worker held at the kill come back after VISIBILITY_TIMEOUT and
    # are acknowledged (redone or skipped, counted once) - the unacknowledged hash empties.
    client = redis_for(failover.env)
    wait_for(lambda: client.hlen(names.KOMBU_UNACKED) == 0 and client.llen(names.bulk_queue("tiny")) == 0, 60,
             "every message acknowledged")
    time.sleep(1.5)  # the worker's metrics reach /metrics with its next heartbeat
    outcomes = bulk_outcomes(failover)
    report(f"kill -9 the master mid-job: bulk pieces by outcome {outcomes} (redone, skipped: handed out again "
           f"after the failover); a 240-item job ({done_before} items done at the kill) ended "
           f"{final['status']} with {final['progress']['items_done']}/240 items counted, {len(set(ids))} distinct "
           f"result lines of {len(ids)}; Sentinel promoted after {promoted_at - killed_at:.1f} s; "
           f"small jobs sent through the failover: {len(accepted)} accepted (202), refused {dict(refused)}, "
           f"accepted jobs lost or incomplete: {small_lost}, items lost: {240 - len(set(ids)) + small_lost * 8}")
    assert final["status"] == "succeeded" and final["progress"]["items_done"] == 240  # counted once each
    assert ids == [f"1-{i}" for i in range(240)]  # every item once, in order
    assert accepted and small_lost == 0 and small_wrong == 0
    assert set(refused) <= {503}, refused
    failover.cluster.rejoin(old)


def test_master_and_worker_killed_together_mid_job(failover):
    """A node that ran the primary and the worker dies: the pieces that worker held are handed out
    again from the new primary (to a new worker), and every item is counted once."""
    from shared.workers import WorkerRegistry

    r = submit(failover, 160, seed=2)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    client = redis_for(failover.env)
    (info,) = WorkerRegistry(client).alive("tiny", fresh=True)
    held = wait_for(lambda: job(failover, job_id)["progress"]["items_done"] > 0
                    and client.smembers(names.held_key(info["id"])), 60, "the worker to hold pieces mid-job")
    failover.worker.signal(signal.SIGKILL)
    failover.worker.stop()
    old, killed_at = failover.cluster.kill_master()
    _, promoted_at = failover.cluster.wait_promotion(old)
    failover.worker = start_worker("failover-worker-2", failover.env, failover.log_dir, "tiny")
    ready_at = time.monotonic()
    final = wait_job(failover, job_id)
    ids = [line["id"] for line in results(failover, job_id)]
    wait_for(lambda: client.hlen(names.KOMBU_UNACKED) == 0, 60, "every message acknowledged")
    report(f"kill -9 the master and the worker together mid-job: the worker held {len(held)} piece(s); "
           f"promoted after {promoted_at - killed_at:.1f} s, a new worker ready after {ready_at - killed_at:.1f} s; "
           f"the 160-item job ended {final['status']} with {final['progress']['items_done']}/160 counted, "
           f"{len(set(ids))} distinct result lines of {len(ids)}, "
           f"{time.monotonic() - killed_at:.1f} s after the kill; items lost: {160 - len(set(ids))}")
    assert held
    assert final["status"] == "succeeded" and final["progress"]["items_done"] == 160
    assert ids == [f"2-{i}" for i in range(160)]
    failover.cluster.rejoin(old)


def test_job_not_on_enough_replicas_is_refused_and_removed(failover, tmp_path):
    """A job that cannot be confirmed on REDIS_MIN_REPLICAS gets a 503, never a 202, and leaves nothing."""
    env = dict(failover.env, REDIS_MIN_REPLICAS="2", REDIS_WAIT_TIMEOUT="0.5")  # there is one replica
    api, url = start_api("failover-api-2-replicas", env, tmp_path)
    try:
        client = redis_for(failover.env)
        jobs_before = set(client.scan_iter("rerank:job:*"))
        folders_before = set(Path(env["DATA_DIR"], "jobs").iterdir())
        r = requests.post(url + "/v1/rerank/jobs", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"items": [{"id": "x", "query": "q", "documents": ["a", "b"]}]}, timeout=30)
        assert r.status_code == 503 and "1 of the 2 Redis replica" in r.json()["error"], r.text
        assert set(client.scan_iter("rerank:job:*")) == jobs_before
        assert set(Path(env["DATA_DIR"], "jobs").iterdir()) == folders_before
        report(f"REDIS_MIN_REPLICAS=2 with one replica: a job is refused with 503 in {r.elapsed.total_seconds():.2f} s, "
               "its state and files removed")
    finally:
        api.stop()


def test_client_follows_the_master_and_jobs_wait_for_a_replica(failover):
    """The service's own client finds the master through the Sentinels and WAIT counts the replica."""
    client = redis_for(failover.env)
    master = failover.cluster.master_port()
    client.set("failover:probe", "1")
    assert client.connection_pool.get_master_address() == ("127.0.0.1", master)
    assert int(client.execute_command("WAIT", 1, 2000)) >= 1



def test_metrics_tell_a_replica_from_a_primary(failover):
    """rerank_redis_state (the alert on Redis refusing writes): ok through the Sentinels, read_only
    for a client pointed at the replica by mistake."""
    import redis

    from shared.cluster_metrics import ClusterCollector
    from shared.settings import Settings

    text = requests.get(failover.url + "/metrics", timeout=5).text
    assert 'rerank_redis_state{state="ok"} 1.0' in text and 'rerank_redis_state{state="read_only"} 0.0' in text
    replica = next(p for p in failover.cluster.nodes if p != failover.cluster.master_port())
    collector = ClusterCollector(redis.Redis(port=replica), Settings(models="tiny=/nowhere"))
    (state,) = [m for m in collector.collect() if m.name == "rerank_redis_state"]
    assert {s.labels["state"]: s.value for s in state.samples}["read_only"] == 1
