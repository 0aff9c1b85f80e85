"""Jobs under pressure: per-token limits, fair turns between tokens, a full disk, the storage sweep
during an upload, a piece that fails for good, and true figures after a cancel."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests

from shared.jobs import JobStore
from shared.storage import JobStorage
from tests.conftest import Stack
from tests.procs import start_api, start_worker, wait_for
from tests.test_jobs import jsonl, make_items, status

pytestmark = pytest.mark.stack

TOKENS3 = ("token-a", "token-b", "token-c")
MAX_BYTES = 120_000


def post_jsonl(stack, items, token, **kwargs):
    return stack.session.post(f"{stack.url}/v1/rerank/jobs", data=jsonl(items), timeout=30,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/jsonl"},
                              **kwargs)


@pytest.fixture(scope="module")
def limited(stack_env, model_dir, log_dir, tmp_path_factory):
    """An API for model `fair` (no worker until a test starts one): 4 jobs in flight and 120 kB of
    input per token, pieces of 8 pairs, three tokens."""
    env = dict(stack_env, MODELS=f"fair={model_dir}", ACCESS_TOKEN=",".join(TOKENS3), MAX_JOBS_PER_TOKEN="4",
               MAX_STORED_BYTES_PER_TOKEN=str(MAX_BYTES), JOB_PIECE_PAIRS="8",
               DATA_DIR=str(tmp_path_factory.mktemp("limited-data")))
    proc, url = start_api("api-limited", env, log_dir)
    with requests.Session() as session:
        yield Stack(url, env, proc, session)
    proc.stop()


def test_per_token_limits_and_fair_turns_between_tokens(limited, log_dir):
    a, b, c = TOKENS3
    jobs_a = []
    for n in range(4):
        r = post_jsonl(limited, make_items(20, seed=40 + n, docs=(4, 4)), a)  # 80 pairs: 10 pieces each
        assert r.status_code == 202, r.text
        jobs_a.append(r.json()["id"])
    r = post_jsonl(limited, make_items(2, seed=44), a)
    assert r.status_code == 429 and "MAX_JOBS_PER_TOKEN" in r.json()["error"] and "4 jobs in flight" in r.json()["error"]
    assert r.headers["Retry-After"]
    r = post_jsonl(limited, make_items(20, seed=45, docs=(4, 4)), b)  # another token is not held back
    assert r.status_code == 202, r.text
    job_b = r.json()["id"]

    big = make_items(200, seed=46, docs=(4, 4))
    assert len(jsonl(big)) > MAX_BYTES
    r = post_jsonl(limited, big, c)
    assert r.status_code == 429 and "MAX_STORED_BYTES_PER_TOKEN" in r.json()["error"]
    storage = JobStorage(str(Path(limited.env["DATA_DIR"]) / "jobs"))
    before = set(storage.job_ids())
    r = limited.session.post(f"{limited.url}/v1/rerank/jobs", data=iter([jsonl(big)]), timeout=30,  # chunked
                             headers={"Authorization": f"Bearer {c}", "Content-Type": "application/jsonl"})
    assert r.status_code == 429 and "MAX_STORED_BYTES_PER_TOKEN" in r.json()["error"]
    assert set(storage.job_ids()) == before, "what was stored of the refused upload is removed"

    worker = start_worker("worker-fair", limited.env, log_dir, "fair")
    try:
        def done(job_id, token):
            s = limited.session.get(f"{limited.url}/v1/rerank/jobs/{job_id}", timeout=10,
                                    headers={"Authorization": f"Bearer {token}"}).json()
            return s
        final_b = wait_for(lambda: done(job_b, b)["status"] == "succeeded" and done(job_b, b), 120, "job B")
        a_done = sum(done(j, a)["progress"]["pairs_done"] for j in jobs_a)
        print(f"\ntoken B's job (80 pairs) finished when token A's 4 jobs had {a_done} of 320 pairs done")
        # First in, first out would have run all of A's 320 pairs first; turns about alternate.
        assert a_done <= 200, a_done
        for j in jobs_a:
            wait_for(lambda: done(j, a)["status"] == "succeeded", 120, "job A")
        assert final_b["progress"]["pairs_done"] == 80
    finally:
        worker.stop()
    # Ended jobs no longer count as in flight, and a deleted one frees its bytes.
    r = limited.session.delete(f"{limited.url}/v1/rerank/jobs/{jobs_a[0]}", headers={"Authorization": f"Bearer {a}"})
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert limited.session.get(f"{limited.url}/v1/rerank/jobs/{jobs_a[0]}",
                               headers={"Authorization": f"Bearer {a}"}).status_code == 404
    assert jobs_a[0] not in storage.job_ids()


def test_the_sweep_spares_an_upload_in_progress(api, stack_env, redis_url):
    """The sweep runs while an upload is half sent (its first pieces stored): its folder has state,
    so it stays; a leftover folder without state goes. The upload then completes into a whole job."""
    from celery import Celery

    from api.jobs import JobService
    from shared.settings import Settings
    from shared.workers import WorkerRegistry

    items = make_items(3000, seed=47, docs=(4, 8))
    body = jsonl(items)
    assert len(body) > 3 << 20
    half = body.rindex(b"\n", 0, len(body) // 2) + 1
    storage = JobStorage(str(Path(stack_env["DATA_DIR"]) / "jobs"))
    leftover = f"job_{'e' * 32}"
    storage.write_bytes(storage.input_path(leftover, 0), b"{}\n")
    client = redis.Redis.from_url(redis_url)
    host, port = api.url.removeprefix("http://").split(":")
    before = set(storage.job_ids())
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall((f"POST /v1/rerank/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-one\r\n"
                      f"Content-Type: application/jsonl\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:half])
        uploading = wait_for(lambda: [j for j in set(storage.job_ids()) - before
                                      if storage.exists(storage.input_path(j, 0))], 30, "a piece of the upload")[0]
        settings = Settings(redis_url=redis_url, models=stack_env["MODELS"], data_dir=stack_env["DATA_DIR"])
        service = JobService(settings, client, Celery(broker=redis_url), WorkerRegistry(client))
        removed = service.sweep(min_age=0)
        assert leftover in removed and uploading not in removed
        assert storage.exists(storage.input_path(uploading, 0))
        sock.sendall(body[half:])
        answer = b""
        while not answer.rstrip().endswith(b"}"):
            answer += sock.recv(65536)
    assert b" 202 " in answer.split(b"\r\n")[0], answer
    job_id = json.loads(answer.partition(b"\r\n\r\n")[2])["id"]
    assert job_id == uploading
    job = JobStore(client, 60).get(job_id)
    assert job.items_total == 3000 and all(storage.exists(storage.input_path(job_id, p)) for p in range(job.pieces_total))
    api.session.delete(f"{api.url}/v1/rerank/jobs/{job_id}", headers={"Authorization": "Bearer token-one"})


def test_a_piece_that_fails_for_good_fails_its_job_visibly(limited, redis_url):
    """What the worker calls when a piece's retries are exhausted (its input was lost, say)."""
    token = TOKENS3[1]
    r = post_jsonl(limited, make_items(12, seed=48, docs=(2, 2)), token)  # 24 pairs: 3 pieces
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    store = JobStore(redis.Redis.from_url(redis_url), 60)
    storage = JobStorage(str(Path(limited.env["DATA_DIR"]) / "jobs"))
    assert store.get(job_id).pieces_total == 3
    for piece in (0, 2):  # as a worker does for the pieces it scored
        inputs = list(storage.read_lines(storage.input_path(job_id, piece)))
        storage.write_lines(storage.result_path(job_id, piece), [{"id": i["id"], "index": i["index"], "results": []}
                                                                  for i in inputs])
        store.complete_piece(job_id, piece, len(inputs), 2 * len(inputs))
    assert store.fail_piece(job_id, 1, "FileNotFoundError: input piece missing")
    assert not store.fail_piece(job_id, 1, "again"), "a piece ends once"
    s = limited.session.get(f"{limited.url}/v1/rerank/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}).json()
    assert s["status"] == "failed" and s["finished_at"]
    assert s["errors"]["pieces_failed"] == 1 and "piece 1: FileNotFoundError" in s["errors"]["last"]
    assert s["progress"]["items_done"] == 8 and s["progress"]["items_total"] == 12
    r = limited.session.get(f"{limited.url}/v1/rerank/jobs/{job_id}/results", headers={"Authorization": f"Bearer {token}"})
    assert len(r.text.splitlines()) == 8 and r.headers["X-Job-Complete"] == "false"


def test_after_a_cancel_the_figures_are_true(api):
    items = make_items(3000, seed=49, docs=(6, 10))
    job_id = submit_jsonl(api, items)
    wait_for(lambda: status(api, job_id)["progress"]["items_done"] > 0, 60, "the job to start")
    cancelled_at = time.time()
    r = api.session.delete(f"{api.url}/v1/rerank/jobs/{job_id}", headers={"Authorization": "Bearer token-one"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["deleted"] is False

    def settled():
        first = status(api, job_id)
        time.sleep(0.5)  # pieces that were running may still end: wait until nothing moves
        second = status(api, job_id)
        return second if first == second else None

    final = wait_for(settled, 60, "the cancelled job to settle")
    p = final["progress"]
    assert final["status"] == "cancelled" and 0 < p["items_done"] < 3000
    from datetime import datetime

    started = datetime.fromisoformat(final["started_at"]).timestamp()
    finished = datetime.fromisoformat(final["finished_at"]).timestamp()
    at_cancel = r.json()
    assert finished >= cancelled_at - 1
    if p["pairs_done"] > at_cancel["progress"]["pairs_done"]:  # pieces running at the cancel ended after it
        assert final["finished_at"] > at_cancel["finished_at"], "finished_at follows the last piece counted"
    assert final["pairs_per_second"] == pytest.approx(p["pairs_done"] / (finished - started), rel=0.01)
    r = api.session.get(f"{api.url}/v1/rerank/jobs/{job_id}/results", headers={"Authorization": "Bearer token-one"})
    assert len(r.text.splitlines()) == p["items_done"], "the results hold exactly the items counted"


def submit_jsonl(stack, items):
    r = stack.post("/v1/rerank/jobs", data=jsonl(items), headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test, unmounted after it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_at_job_creation_is_a_507_and_leaves_nothing(stack_env, model_dir, log_dir, small_disk):
    env = dict(stack_env, MODELS=f"disk={model_dir}", JOBS_URL=str(small_disk / "jobs"))
    proc, url = start_api("api-small-disk", env, log_dir)
    try:
        headers = {"Authorization": "Bearer token-one", "Content-Type": "application/jsonl"}
        body = jsonl(make_items(1500, seed=50, docs=(4, 8)))
        assert len(body) > 1 << 20
        r = requests.post(f"{url}/v1/rerank/jobs", data=body, headers=headers, timeout=60)
        assert r.status_code == 507 and r.json()["error_type"] == "insufficient_storage", r.text
        assert "No space left on device" in r.json()["error"] and "nothing was stored" in r.json()["error"]
        assert not list((small_disk / "jobs").iterdir()), "what was stored of the job is removed"
        r = requests.post(f"{url}/v1/rerank/jobs", data=jsonl(make_items(3, seed=51)), headers=headers, timeout=60)
        assert r.status_code == 202, "space is back: jobs are taken again"
        requests.delete(f"{url}/v1/rerank/jobs/{r.json()['id']}", headers=headers, timeout=10)
    finally:
        proc.stop()
