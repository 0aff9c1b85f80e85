"""Job inputs and outputs at scale: truncated bodies, JSON size cap, input by URL (local folder and an
S3-compatible store), Parquet in and out, every finished piece readable, resumable downloads, CLI."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests

from rerank.launch import free_port
from shared.jobs import JobStore
from shared.storage import JobStorage
from tests.conftest import TOKENS
from tests.procs import ROOT, Proc, start_api, start_worker, wait_for
from tests.test_jobs import jsonl, make_items, results, wait_finished

pytestmark = pytest.mark.stack

AUTH = {"Authorization": f"Bearer {TOKENS[0]}"}


def storage_of(stack) -> JobStorage:
    return JobStorage(str(Path(stack.env["DATA_DIR"]) / "jobs"))


def stored_jobs(stack) -> set[str]:
    return set(storage_of(stack).job_ids())


def raw_upload(url: str, body: bytes, *, announced: int, path: str = "/v1/rerank/jobs") -> tuple[int, dict]:
    """Send `body` under a Content-Length of `announced`, then half-close: the client stops sending."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKENS[0]}\r\n"
                f"Content-Type: application/jsonl\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n")
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_a_body_shorter_than_its_content_length_is_refused_and_nothing_is_kept(api, redis_url):
    client = redis.Redis.from_url(redis_url)
    body = jsonl(make_items(400, seed=21))
    cut = body[: body.rindex(b"\n", 0, len(body) // 2) + 1]  # ends at a line boundary: looks complete
    before_jobs, before_keys = stored_jobs(api), set(client.keys("rerank:job:*"))
    code, answer = raw_upload(api.url, cut, announced=len(body))
    assert code == 400 and answer["error_type"] == "truncated_body", answer
    assert f"after {len(cut)} of the {len(body)} bytes" in answer["error"]
    assert stored_jobs(api) == before_jobs, "whatever was stored of the body is removed"
    assert set(client.keys("rerank:job:*")) == before_keys, "no job state is left"
    # The same bytes with a true Content-Length are a job.
    code, answer = raw_upload(api.url, cut, announced=len(cut))
    assert code == 202, answer
    wait_finished(api, answer["id"])


def test_a_json_body_over_max_request_bytes_points_at_json_lines(api):
    items = make_items(600, seed=22)
    r = api.post("/v1/rerank/jobs", {"items": items})
    assert r.status_code == 413
    assert "MAX_REQUEST_BYTES" in r.json()["error"] and "application/jsonl" in r.json()["error"]
    r = api.post("/v1/rerank/jobs", data=jsonl(items), headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202
    wait_finished(api, r.json()["id"])


def test_input_url_is_refused_when_no_prefix_is_allowed(api, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(jsonl(make_items(2, seed=23)))
    for url in (str(path), f"file://{path}", "/etc/passwd", "s3://bucket/items.jsonl"):
        r = api.post("/v1/rerank/jobs", {"input_url": url})
        assert r.status_code == 403 and "JOB_INPUT_PREFIXES" in r.json()["error"], (url, r.text)


# --- a server that allows a local folder and an S3 bucket as inputs -----------------------------


@pytest.fixture(scope="module")
def s3(log_dir):
    """moto's S3-compatible server on a free loopback port, or None where it cannot start."""
    pytest.importorskip("s3fs")
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = Proc("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(url, timeout=1).status_code < 500, 90, "moto", proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.stop()
        pytest.skip(f"moto's S3 server could not start here: {exc}")
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def url_api(stack_env, worker, log_dir, tmp_path_factory, s3):
    allowed = tmp_path_factory.mktemp("allowed-inputs")
    env = dict(stack_env, JOB_INPUT_PREFIXES=f"{allowed},s3://inputs/allowed", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", FSSPEC_S3_ENDPOINT_URL=s3)
    proc, url = start_api("api-inputs", env, log_dir)
    with requests.Session() as session:
        from tests.conftest import Stack

        stack = Stack(url, env, proc, session)
        stack.allowed = allowed
        yield stack
    proc.stop()


def test_input_url_under_an_allowed_folder_is_read_and_nothing_else(url_api, tmp_path):
    items = make_items(120, seed=24)
    inside = url_api.allowed / "batch" / "items.jsonl"
    inside.parent.mkdir()
    inside.write_bytes(jsonl(items))
    r = url_api.post("/v1/rerank/jobs", {"input_url": str(inside), "return_documents": True})
    assert r.status_code == 202, r.text
    final, _ = wait_finished(url_api, r.json()["id"])
    assert final["status"] == "succeeded" and final["progress"]["items_total"] == 120
    lines, _ = results(url_api, r.json()["id"])
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    r = url_api.post("/v1/rerank/jobs", {"input_url": f"file://{inside}"})
    assert r.status_code == 202, r.text

    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(jsonl(items[:1]))
    sibling = Path(f"{url_api.allowed}-evil")
    sibling.mkdir()
    (sibling / "items.jsonl").write_bytes(jsonl(items[:1]))
    (url_api.allowed / "link.jsonl").symlink_to(secret)
    (url_api.allowed / "dir-link").symlink_to(tmp_path)
    refused = [
        str(secret), f"file://{secret}", f"{url_api.allowed}/../{tmp_path.name}/secret.jsonl",
        f"{url_api.allowed}/batch/../../{secret.parent.name}/secret.jsonl", str(url_api.allowed / "link.jsonl"),
        str(url_api.allowed / "dir-link" / "secret.jsonl"), str(sibling / "items.jsonl"),
        f"file://localhost{secret}", f"simplecache::file://{inside}", "/etc/passwd",
        "s3://inputs/allowed/../secret.jsonl", "s3://inputs/allowed/%2e%2e/secret.jsonl", "s3://inputs/allowed-evil/x",
        "memory://inputs/allowed/x.jsonl",
    ]
    for url in refused:
        r = url_api.post("/v1/rerank/jobs", {"input_url": url})
        assert r.status_code in (403, 422), (url, r.text)
        if r.status_code == 422:  # allowed place, but it does not exist: never read outside
            assert "no such file" in r.json()["error"] or "cannot be read" in r.json()["error"], (url, r.text)
        else:
            assert r.json()["error_type"] == "forbidden" and "not allowed" in r.json()["error"], (url, r.text)
    missing = url_api.post("/v1/rerank/jobs", {"input_url": str(url_api.allowed / "nope.jsonl")})
    assert missing.status_code == 422 and "no such file" in missing.json()["error"]


def test_input_url_on_an_s3_compatible_store(url_api, s3):
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3)
    fs.mkdir("inputs", region_name="eu-west-1")
    items = make_items(80, seed=25)
    fs.pipe("inputs/allowed/items.jsonl", jsonl(items))
    fs.pipe("inputs/other/items.jsonl", jsonl(items))
    r = url_api.post("/v1/rerank/jobs", {"input_url": "s3://inputs/allowed/items.jsonl"})
    assert r.status_code == 202, r.text
    final, _ = wait_finished(url_api, r.json()["id"])
    assert final["status"] == "succeeded" and final["progress"]["items_total"] == 80
    lines, _ = results(url_api, r.json()["id"])
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    r = url_api.post("/v1/rerank/jobs", {"input_url": "s3://inputs/other/items.jsonl"})
    assert r.status_code == 403


# --- Parquet ------------------------------------------------------------------------------------


def test_parquet_input_and_results_match_json_lines(api, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    items = make_items(150, seed=26)
    table = pa.Table.from_pylist([{"id": i["id"], "query": i["query"], "documents": i["documents"],
                                   "top_n": i["top_n"]} for i in items])
    path = tmp_path / "items.parquet"
    pq.write_table(table, path, row_group_size=40)
    r = api.post("/v1/rerank/jobs?return_documents=true", data=path.read_bytes(),
                 headers={"Content-Type": "application/vnd.apache.parquet"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_finished(api, job_id)
    lines, _ = results(api, job_id)
    assert [line["id"] for line in lines] == [i["id"] for i in items]

    for how in ({"params": {"format": "parquet"}}, {"headers": {"Accept": "application/vnd.apache.parquet"}}):
        r = api.session.get(f"{api.url}/v1/rerank/jobs/{job_id}/results", timeout=30,
                            headers={**AUTH, **how.get("headers", {})}, params=how.get("params"))
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/vnd.apache.parquet"
        (tmp_path / "out.parquet").write_bytes(r.content)
        rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
        assert [row["id"] for row in rows] == [line["id"] for line in lines]
        assert [row["index"] for row in rows] == list(range(150))
        for row, line in zip(rows, lines):
            assert [x["index"] for x in row["results"]] == [x["index"] for x in line["results"]]
            assert [x["document"]["text"] for x in row["results"]] == [x["document"]["text"] for x in line["results"]]
            assert max(abs(a["relevance_score"] - b["relevance_score"])
                       for a, b in zip(row["results"], line["results"])) < 1e-9
            assert row["input_tokens"] == line["meta"]["tokens"]["input_tokens"]

    bad = pa.Table.from_pylist([{"query": "q", "documents": ["a"]}, {"query": "", "documents": ["a"]},
                                {"query": "q", "documents": []}])
    pq.write_table(bad, tmp_path / "bad.parquet")
    r = api.post("/v1/rerank/jobs", data=(tmp_path / "bad.parquet").read_bytes(),
                 headers={"Content-Type": "application/vnd.apache.parquet"})
    assert r.status_code == 422 and [f["field"] for f in r.json()["fields"]] == ["row 2", "row 3"]
    pq.write_table(pa.Table.from_pylist([{"question": "q", "documents": ["a"]}]), tmp_path / "cols.parquet")
    r = api.post("/v1/rerank/jobs", data=(tmp_path / "cols.parquet").read_bytes(),
                 headers={"Content-Type": "application/vnd.apache.parquet"})
    assert r.status_code == 422 and "no column query" in r.json()["error"]
    r = api.post("/v1/rerank/jobs", data=b"not parquet at all",
                 headers={"Content-Type": "application/vnd.apache.parquet"})
    assert r.status_code == 422 and "Parquet" in r.json()["error"]


def test_without_pyarrow_parquet_is_refused_with_a_clear_message(stack_env, monkeypatch):
    """The API process of an image without the extra: `import pyarrow` fails."""
    from api.app import create_app
    from shared.settings import Settings

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    settings = Settings(**{k.lower(): v for k, v in stack_env.items()
                           if k in ("REDIS_URL", "MODELS", "ACCESS_TOKEN", "DATA_DIR")})
    client = create_app(settings).test_client()
    r = client.post("/v1/rerank/jobs", data=b"PAR1", headers={**AUTH, "Content-Type": "application/vnd.apache.parquet"})
    assert r.status_code == 415 and "pyarrow" in r.json["error"]
    r = client.post("/v1/rerank/jobs", json={"items": [{"query": "q", "documents": ["a"]}], "model": "tiny"},
                    headers=AUTH)
    assert r.status_code == 202
    job_id = r.json["id"]
    r = client.get(f"/v1/rerank/jobs/{job_id}/results?format=parquet", headers=AUTH)
    assert r.status_code == 422 and "pyarrow" in r.json["error"]
    assert client.get(f"/v1/rerank/jobs/{job_id}/results", headers=AUTH).status_code == 200


# --- results while a job runs, and resuming them ------------------------------------------------


def test_results_stream_every_finished_piece_and_start_from_an_index(multi_api, redis_url):
    """Pieces 0 and 2 of 4 are finished (written and counted as a worker does): both are readable."""
    items = make_items(600, seed=27, docs=(2, 2))
    r = multi_api.post("/v1/rerank/jobs?model=spare", data=jsonl(items), token=None,
                       headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    store, storage = JobStore(redis.Redis.from_url(redis_url), 3600), storage_of(multi_api)
    total = store.get(job_id).pieces_total
    assert total >= 3
    finished = {}
    for piece in (0, 2):
        inputs = list(storage.read_lines(storage.input_path(job_id, piece)))
        finished[piece] = [{"id": i["id"], "index": i["index"], "results": [], "meta": {"tokens": {"input_tokens": 1}}}
                           for i in inputs]
        storage.write_lines(storage.result_path(job_id, piece), finished[piece])
        assert store.complete_piece(job_id, piece, len(inputs), 2 * len(inputs))
    try:
        r = multi_api.session.get(f"{multi_api.url}/v1/rerank/jobs/{job_id}/results", timeout=10)
        got = [json.loads(line)["index"] for line in r.text.splitlines()]
        want = [line["index"] for line in finished[0] + finished[2]]
        assert got == want and r.headers["X-Job-Complete"] == "false"
        start = finished[0][-1]["index"]  # inside piece 0, past pieces 1's place
        r = multi_api.session.get(f"{multi_api.url}/v1/rerank/jobs/{job_id}/results?start={start}", timeout=10)
        assert [json.loads(line)["index"] for line in r.text.splitlines()] == [x for x in want if x >= start]
        bad = multi_api.session.get(f"{multi_api.url}/v1/rerank/jobs/{job_id}/results?start=-1", timeout=10)
        assert bad.status_code == 422
    finally:
        multi_api.session.delete(f"{multi_api.url}/v1/rerank/jobs/{job_id}", timeout=10)


def test_cli_submits_with_flags_in_either_position_shows_upload_progress_and_resumes(api, tmp_path):
    items = make_items(200, seed=28)
    source = tmp_path / "items.jsonl"
    source.write_bytes(jsonl(items))
    env = dict(os.environ, RERANK_URL=api.url, PYTHONPATH=str(ROOT))
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "rerank", "jobs", "submit", str(source), "--wait", "-o", str(out),
                          "--token", TOKENS[0]], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "upload" in run.stderr and "100%" in run.stderr, "a progress bar during the upload"
    job_id = re.search(r"job_[0-9a-f]{32}", run.stderr).group(0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(200))

    # A download cut in the middle of a line, taken up again: every line once, in order.
    full = out.read_bytes()
    out.write_bytes(full[: len(full) // 2])
    run = subprocess.run([sys.executable, "-m", "rerank", "jobs", "results", job_id, "-o", str(out), "--resume",
                          "--quiet", "--token", TOKENS[0]], env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == full
    run = subprocess.run([sys.executable, "-m", "rerank", "jobs", "--token", TOKENS[0], "status", job_id, "--quiet"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0 and json.loads(run.stdout)["status"] == "succeeded", run.stderr


def test_job_storage_on_an_s3_compatible_store(stack_env, model_dir, log_dir, s3):
    """JOBS_URL=s3://…: the API (an event-loop worker) and a worker share pieces through S3."""
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3).mkdir("jobs", region_name="eu-west-1")
    env = dict(stack_env, MODELS=f"s3model={model_dir}", JOBS_URL="s3://jobs/rerank", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", FSSPEC_S3_ENDPOINT_URL=s3)
    worker = start_worker("worker-s3", env, log_dir, "s3model")
    proc, url = start_api("api-s3-storage", env, log_dir)
    try:
        from tests.conftest import Stack

        with requests.Session() as session:
            stack = Stack(url, env, proc, session)
            items = make_items(60, seed=29)
            r = stack.post("/v1/rerank/jobs", data=jsonl(items), headers={"Content-Type": "application/jsonl"})
            assert r.status_code == 202, r.text
            final, _ = wait_finished(stack, r.json()["id"])
            assert final["status"] == "succeeded", final
            lines, headers = results(stack, r.json()["id"])
            assert [line["id"] for line in lines] == [i["id"] for i in items] and headers["X-Job-Complete"] == "true"
    finally:
        proc.stop()
        worker.stop()
