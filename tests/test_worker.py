"""The worker around its engine process: what happens when the engine dies, when a job is
cancelled while its piece is being scored, and when one document is enormous."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import redis
import requests

from rerank.random_model import sentence
from shared.workers import WorkerRegistry
from tests.procs import start_api, start_worker, wait_for

pytestmark = pytest.mark.stack


def live(env: dict, model: str) -> list[dict]:
    return WorkerRegistry(redis.Redis.from_url(env["REDIS_URL"])).alive(model, fresh=True)


def test_the_model_runs_in_its_own_process_and_its_death_ends_the_worker(multi_api, log_dir):
    worker = start_worker("worker-spare-engine", multi_api.env, log_dir, "spare")
    try:
        (info,) = [w for w in live(multi_api.env, "spare") if w["pid"] == worker.pid]
        assert info["engine_pid"] and info["engine_pid"] != worker.pid and info["capacity"] > 0
        # The worker process only tokenizes: torch lives in the engine process alone.
        assert "libtorch" not in open(f"/proc/{worker.pid}/maps").read()
        assert "libtorch" in open(f"/proc/{info['engine_pid']}/maps").read()
        os.kill(info["engine_pid"], signal.SIGKILL)
        # Nothing can be scored any more: the worker leaves at once (status 4: restart me).
        assert wait_for(lambda: worker.popen.poll() is not None, 20, "the worker to exit", None) is True
        assert worker.popen.returncode == 4
        assert "engine exited" in worker.log_tail(50)
        r = multi_api.post("/v1/rerank", {"model": "spare", "query": "q", "documents": ["a"]}, token=None)
        assert r.status_code == 503, r.text
    finally:
        worker.stop()


def test_a_cancelled_job_stops_scoring_its_running_piece(multi_api, log_dir):
    """One piece of thousands of pairs, scored in small batches: the DELETE lands while the piece
    is in the engine, which drops its pairs not yet scored; nothing of the piece is counted."""
    env = dict(multi_api.env, JOB_PIECE_PAIRS="6000", MAX_BATCH_TOKENS="512", TORCH_THREADS="1")
    api, url = start_api("api-spare-cancel", env, log_dir)
    worker = start_worker("worker-spare-cancel-running", env, log_dir, "spare")
    try:
        rng = __import__("random").Random(3)
        lines = [json.dumps({"id": i, "query": "where is the queue",
                             "documents": [sentence(rng, 60) for _ in range(20)]}) for i in range(300)]
        r = requests.post(url + "/v1/rerank/jobs?model=spare", data="\n".join(lines).encode(), timeout=60,
                          headers={"Content-Type": "application/jsonl"})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        wait_for(lambda: requests.get(f"{url}/v1/rerank/jobs/{job}", timeout=5).json()["status"] == "running",
                 60, "the piece to start")
        time.sleep(0.3)  # well into the piece's 6000 pairs
        cancelled_at = time.monotonic()
        r = requests.delete(f"{url}/v1/rerank/jobs/{job}", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        wait_for(lambda: f"job {job} piece 0: cancelled" in worker.log_tail(200), 30, "the piece to stop", worker)
        assert time.monotonic() - cancelled_at < 10  # the whole piece alone takes longer than that here
        final = requests.get(f"{url}/v1/rerank/jobs/{job}", timeout=5).json()
        assert final["status"] == "cancelled" and final["progress"]["items_done"] == 0
        assert final["progress"]["pairs_done"] == 0
    finally:
        worker.stop()
        api.stop()


def test_an_enormous_document_is_answered_and_the_worker_never_looks_dead(api, log_dir):
    """A 15 MB document (below a 16 MB MAX_REQUEST_BYTES): only the text within reach of the kept
    tokens is tokenized, and the heartbeat lives in a process that never runs the model."""
    env = dict(api.env, MAX_REQUEST_BYTES=str(16 * 1024 * 1024))
    big_api, url = start_api("api-big-bodies", env, log_dir)
    try:
        rng = __import__("random").Random(5)
        words = " ".join(w for _ in range(200) for w in sentence(rng, 40).split() if w.isascii())
        huge = (words + " ") * (15_000_000 // (len(words) + 1))  # 15 MB of JSON
        outcomes: dict[str, object] = {}

        def small_calls():
            codes = []
            while "big" not in outcomes:
                codes.append(requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["a", "b"]},
                                           headers={"Authorization": "Bearer token-one"}, timeout=30).status_code)
                codes.append(requests.get(url + "/ready", timeout=30).status_code)
            outcomes["small"] = codes

        beside = threading.Thread(target=small_calls)
        beside.start()
        started = time.monotonic()
        r = requests.post(url + "/v1/rerank", json={"query": "needle", "documents": [huge, "small"]},
                          headers={"Authorization": "Bearer token-one"}, timeout=60)
        outcomes["big"] = r.status_code, time.monotonic() - started
        beside.join()
        assert r.status_code == 200, r.text[:300]
        assert set(outcomes["small"]) == {200}, outcomes["small"]
    finally:
        big_api.stop()


def test_a_simulated_worker_serves_through_the_real_stack_and_says_so(stack_env, log_dir, tmp_path_factory):
    """DEVICE=sim: the real tokenizer, engine process, Celery and API around a simulated H100;
    its placeholder scores are announced in the log, /v1/models and /info."""
    from rerank.random_model import build_model

    path = build_model(tmp_path_factory.mktemp("models") / "base-sim", "base", weights=False)
    env = dict(stack_env, MODELS=f"simbase={path}", DEVICE="sim")
    env.pop("ACCESS_TOKEN")
    worker = start_worker("worker-sim", env, log_dir, "simbase")
    api, url = start_api("api-sim", env, log_dir)
    try:
        r = requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["a b", "c", "a b"]}, timeout=10)
        assert r.status_code == 200, r.text
        scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert scores[0] == scores[2]  # placeholders are a function of the tokens
        (card,) = requests.get(url + "/v1/models", timeout=5).json()["data"]
        assert card["simulated"] is True and card["devices"] == ["sim"] and "simulated H100" in card["backends"][0]
        assert requests.get(url + "/info", timeout=5).json()["simulated"] is True
        assert "SIMULATED device" in worker.log_tail(100)
    finally:
        api.stop()
        worker.stop()


def test_a_piece_whose_input_is_gone_fails_its_job_visibly(multi_api, log_dir):
    """Storage that fails for good (here the stored input of one piece was deleted) fails that
    piece, and so its job, with the reason; the other pieces are scored. Nothing hangs."""
    from pathlib import Path

    env = dict(multi_api.env, JOB_PIECE_PAIRS="8")
    api, url = start_api("api-spare-lost-input", env, log_dir)
    worker = None
    try:
        lines = [json.dumps({"id": i, "query": "q", "documents": ["a b", "c d"]}) for i in range(12)]
        r = requests.post(url + "/v1/rerank/jobs?model=spare", data="\n".join(lines).encode(), timeout=30,
                          headers={"Content-Type": "application/jsonl"})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        (Path(env["DATA_DIR"]) / "jobs" / job / "input" / "0000001.jsonl").unlink()  # no worker has run it yet
        worker = start_worker("worker-spare-lost-input", env, log_dir, "spare")

        def ended():
            s = requests.get(f"{url}/v1/rerank/jobs/{job}", timeout=5).json()
            return s if s["status"] in ("succeeded", "failed", "cancelled") else None

        final = wait_for(ended, 60, "the job to end", worker)
        assert final["status"] == "failed" and final["errors"]["pieces_failed"] == 1
        assert "FileNotFoundError" in final["errors"]["last"]
        assert final["progress"]["items_done"] == 8 and final["progress"]["items_total"] == 12
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
