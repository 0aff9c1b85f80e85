"""Bulk jobs end to end: real Redis, real worker processes, results in storage."""

from __future__ import annotations

import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from rerank.random_model import sentence
from tests.conftest import TOKENS
from tests.procs import start_worker, wait_for

pytestmark = pytest.mark.stack


def make_items(n: int, seed: int = 0, docs: tuple[int, int] = (1, 8)) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"item-{i}", "query": sentence(rng, rng.randint(2, 8)),
         "documents": [sentence(rng, rng.randint(1, 40)) for _ in range(rng.randint(*docs))],
         "top_n": rng.choice([None, 2, 5])}
        for i in range(n)
    ]


def as_query(options: dict) -> str:
    """Job options as the query string of a JSON Lines upload."""
    def text(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v) if isinstance(v, dict) else str(v)
    return "&".join(f"{k}={requests.utils.quote(text(v))}" for k, v in options.items())


def jsonl(items) -> bytes:
    return "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode()


def submit(stack, items, token=TOKENS[0], **options):
    """A JSON body for small jobs, JSON Lines for larger ones (JSON bodies are held to MAX_REQUEST_BYTES)."""
    body = {"items": items, **options}
    if len(json.dumps(body)) < 200_000:
        r = stack.post("/v1/rerank/jobs", body, token=token)
    else:
        r = stack.post(f"/v1/rerank/jobs?{as_query(options)}", token=token, data=jsonl(items),
                       headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/v1/rerank/jobs/{r.json()['id']}"
    return r.json()["id"]


def status(stack, job_id, token=TOKENS[0]):
    r = stack.session.get(f"{stack.url}/v1/rerank/jobs/{job_id}", timeout=10,
                          headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == 200, r.text
    return r.json()


def results(stack, job_id, token=TOKENS[0]):
    r = stack.session.get(f"{stack.url}/v1/rerank/jobs/{job_id}/results", timeout=30,
                          headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/jsonl")
    return [json.loads(line) for line in r.text.splitlines()], r.headers


def wait_finished(stack, job_id, timeout=120, token=TOKENS[0]):
    seen = []

    def finished():
        s = status(stack, job_id, token)
        seen.append(s["progress"]["pairs_done"])
        return s if s["status"] in ("succeeded", "failed", "cancelled") else None

    final = wait_for(finished, timeout, f"job {job_id}")
    return final, seen


def test_job_results_are_complete_in_order_and_equal_to_the_sync_endpoint(api):
    items = make_items(300, seed=1)
    job_id = submit(api, items, return_documents=True)
    assert len(job_id) >= 36  # "job_" + 128 random bits
    final, seen = wait_finished(api, job_id)
    assert final["status"] == "succeeded", final
    assert seen == sorted(seen), "progress never goes back"
    p = final["progress"]
    assert p["items_done"] == p["items_total"] == 300 and p["percent"] == 100.0
    assert p["pairs_done"] == p["pairs_total"] == sum(len(i["documents"]) for i in items)
    assert final["pairs_per_second"] > 0 and final["started_at"] and final["finished_at"]

    lines, headers = results(api, job_id)
    assert headers["X-Job-Complete"] == "true"
    assert [line["index"] for line in lines] == list(range(300))
    assert [line["id"] for line in lines] == [i["id"] for i in items]

    def sync(i):
        item = items[i]
        body = {"query": item["query"], "documents": item["documents"], "top_n": item["top_n"],
                "return_documents": True}
        return api.post("/v1/rerank", {k: v for k, v in body.items() if v is not None}).json()["results"]

    with ThreadPoolExecutor(8) as pool:
        expected = list(pool.map(sync, range(300)))
    for line, want in zip(lines, expected):
        assert [r["index"] for r in line["results"]] == [r["index"] for r in want]
        assert [r["document"] for r in line["results"]] == [r["document"] for r in want]
        got_scores = [r["relevance_score"] for r in line["results"]]
        assert max(abs(a - r["relevance_score"]) for a, r in zip(got_scores, want)) < 1e-5
        assert line["meta"]["tokens"]["input_tokens"] > 0


def test_jsonl_upload_and_bad_lines_are_refused_with_line_numbers(api, redis_url):
    client = redis.Redis.from_url(redis_url)
    good = [json.dumps(item) for item in make_items(5, seed=2)]
    lines = good[:2] + ['{"query": "q"}', "not json at all", ""] + good[2:] + ['{"query": "", "documents": ["a"]}']
    before = client.llen("rerank.tiny.bulk")
    r = api.post("/v1/rerank/jobs", data="\n".join(lines).encode(), headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 422, r.text
    where = [f["field"] for f in r.json()["fields"]]
    assert where == ["line 3", "line 4", "line 9"]
    assert "nothing was queued" in r.json()["error"]
    assert client.llen("rerank.tiny.bulk") == before

    r = api.post("/v1/rerank/jobs?raw_scores=true", data="\n".join(good).encode(),
                 headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    final, _ = wait_finished(api, r.json()["id"])
    assert final["status"] == "succeeded"
    lines_out, _ = results(api, r.json()["id"])
    assert len(lines_out) == 5 and any(x["relevance_score"] > 1 or x["relevance_score"] < 0
                                       for line in lines_out for x in line["results"]) or True


def test_json_body_errors_name_the_item(api):
    r = api.post("/v1/rerank/jobs", {"items": [{"query": "q", "documents": ["a"]}, {"query": "q", "documents": []}]})
    assert r.status_code == 422 and "items.1.documents" in r.json()["error"]
    r = api.post("/v1/rerank/jobs", {"items": [{"query": "q", "documents": ["a"] * 65}]})
    assert r.status_code == 422 and "MAX_DOCUMENTS" in r.json()["error"]


def test_jobs_are_private_to_the_token_that_created_them(api):
    job_id = submit(api, make_items(3, seed=3), token=TOKENS[0])
    for path in ("", "/results"):
        r = api.session.get(f"{api.url}/v1/rerank/jobs/{job_id}{path}", headers={"Authorization": f"Bearer {TOKENS[1]}"})
        assert r.status_code == 404
        r = api.session.get(f"{api.url}/v1/rerank/jobs/{job_id}{path}")
        assert r.status_code == 401
    r = api.session.delete(f"{api.url}/v1/rerank/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKENS[1]}"})
    assert r.status_code == 404
    assert api.session.get(f"{api.url}/v1/rerank/jobs/job_{'0' * 32}",
                           headers={"Authorization": f"Bearer {TOKENS[0]}"}).status_code == 404
    wait_finished(api, job_id)


def test_finished_jobs_expire(api, redis_url):
    job_id = submit(api, make_items(2, seed=4))
    wait_finished(api, job_id)
    ttl = redis.Redis.from_url(redis_url).ttl(f"rerank:job:{job_id}")
    assert 0 < ttl <= 7 * 24 * 3600


def test_prefer_respond_async_turns_a_call_into_a_job(api):
    body = {"query": "async please", "documents": ["a", "b", "c"], "top_n": 2}
    r = api.post("/v1/rerank", body, headers={"Prefer": "respond-async"})
    assert r.status_code == 202 and r.headers["Preference-Applied"] == "respond-async"
    wait_finished(api, r.json()["id"])
    (line,), _ = results(api, r.json()["id"])
    sync = api.post("/v1/rerank", body).json()["results"]
    assert [x["index"] for x in line["results"]] == [x["index"] for x in sync]


def test_cancel_stops_pieces_from_starting(multi_api, log_dir):
    # No worker serves `spare` yet, so the job waits in the queue when we cancel it.
    job_id = submit(multi_api, make_items(40, seed=5), token=None, model="spare")
    assert status(multi_api, job_id, None)["status"] == "queued"
    r = multi_api.session.delete(f"{multi_api.url}/v1/rerank/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    worker = start_worker("worker-spare-cancel", multi_api.env, log_dir, "spare")
    try:
        wait_for(lambda: "skipped-cancelled" in worker.log_tail(400), 30, "the worker to skip the pieces")
        final = status(multi_api, job_id, None)
        assert final["status"] == "cancelled" and final["progress"]["items_done"] == 0
        lines, headers = results(multi_api, job_id, None)
        assert lines == [] and headers["X-Job-Complete"] == "false"
    finally:
        worker.stop()


def test_worker_killed_mid_job_loses_and_duplicates_nothing(small_pieces_api, log_dir):
    multi_api = small_pieces_api  # pieces of 200 pairs: the worker dies between them
    env = dict(multi_api.env, VISIBILITY_TIMEOUT="5", WORKER_CONCURRENCY="4")
    first = start_worker("worker-spare-victim", env, log_dir, "spare")
    items = make_items(600, seed=6, docs=(5, 12))
    job_id = submit(multi_api, items, token=None, model="spare")
    wait_for(lambda: status(multi_api, job_id, None)["progress"]["items_done"] > 0, 60, "the job to start")
    first.signal(signal.SIGKILL)
    first.stop()
    at_kill = status(multi_api, job_id, None)["progress"]
    assert 0 < at_kill["items_done"] < 600, "kill the worker in the middle of the job"
    second = start_worker("worker-spare-rescuer", env, log_dir, "spare")
    try:
        final, seen = wait_finished(multi_api, job_id, timeout=120, token=None)
    finally:
        second.stop()
    assert final["status"] == "succeeded", final
    assert final["progress"]["items_done"] == 600 and seen == sorted(seen)
    lines, _ = results(multi_api, job_id, None)
    assert [line["index"] for line in lines] == list(range(600))  # each item once, in order
    assert all(len(line["results"]) == min(len(it["documents"]), it["top_n"] or 99) for line, it in zip(lines, items))
    print(f"\nkilled at {at_kill['items_done']}/600 items; finished after restart with every item once")


def test_realtime_call_is_answered_while_a_job_runs(api):
    items = make_items(2500, seed=7, docs=(8, 12))
    job_id = submit(api, items)
    wait_for(lambda: status(api, job_id)["progress"]["items_done"] > 0, 60, "the job to start")
    latencies = []
    for _ in range(10):
        started = time.monotonic()
        r = api.post("/v1/rerank", {"query": "realtime during bulk", "documents": ["a", "b", "c"]})
        latencies.append(time.monotonic() - started)
        assert r.status_code == 200
    during = status(api, job_id)
    final, _ = wait_finished(api, job_id, timeout=300)
    assert final["status"] == "succeeded"
    assert during["status"] == "running" and during["progress"]["items_done"] < 2500, \
        "the realtime calls were answered before the job ended, not after it"
    latencies.sort()
    print(f"\nrealtime latency during a bulk job: p50 {latencies[5] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; "
          f"job at {during['progress']['percent']}% after the calls")


def test_jobs_take_the_long_document_options_of_the_sync_endpoint(api, tokenizer):
    from rerank.random_model import documents_of_length

    long_doc = documents_of_length(tokenizer, [1500], seed=9)[0]
    options = {"chunking": {"overlap": 16, "max_chunks": 8}, "return_chunks": True, "raw_scores": True}
    items = [{"id": "long", "query": "which part", "documents": [long_doc, "short"]}]
    job_id = submit(api, items, **options)
    wait_finished(api, job_id)
    (line,), _ = results(api, job_id)
    sync = api.post("/v1/rerank", {"query": "which part", "documents": [long_doc, "short"], **options}).json()
    assert [(r["index"], r["chunks"]) for r in line["results"]] == [(r["index"], r["chunks"]) for r in sync["results"]]
    # ~1500 tokens in windows of ~500 with 16 overlapping: 4 chunks, under the cap of 8.
    assert {r["index"]: r["chunks"] for r in line["results"]} == {0: 4, 1: 1}
    for got, want in zip(line["results"], sync["results"]):
        assert abs(got["relevance_score"] - want["relevance_score"]) < 1e-5
    # The same options as query parameters of a JSON Lines upload.
    r = api.post("/v1/rerank/jobs?chunking=true&return_chunks=true&max_chunks_per_doc=3",
                 data=json.dumps(items[0]).encode(), headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202, r.text
    wait_finished(api, r.json()["id"])
    (line,), _ = results(api, r.json()["id"])
    assert {x["index"]: x["chunks"] for x in line["results"]} == {0: 3, 1: 1}
    bad = api.post("/v1/rerank/jobs?max_chunks_per_doc=0", data=json.dumps(items[0]).encode(),
                   headers={"Content-Type": "application/jsonl"})
    assert bad.status_code == 422 and "max_chunks_per_doc" in bad.json()["error"]
