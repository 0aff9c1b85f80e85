"""What the service survives, each as a number: load, faults, bad input, security.

Run alone, with a summary table at the end:  ./test.sh -m hardening
The figures are printed by tests/conftest.py (pytest_terminal_summary) and recorded in docs/operations.md.
HARDENING_REQUESTS sets the load test's request count (default 10 000).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerank.launch import free_port
from rerank.random_model import sentence
from tests.procs import Proc, base_env, start_api, start_redis, start_worker, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.hardening]

TOKENS = ("hard-token-A", "hard-token-B")
SYNC_TIMEOUT = 3.0
FIGURES: list[dict[str, str]] = []


def record(area: str, tried: str, amount: str, outcome: str) -> None:
    FIGURES.append({"area": area, "tried": tried, "amount": amount, "outcome": outcome})


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn's workers), in MiB."""
    total = 0
    pids = [pid] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _ppid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@dataclass
class Hard:
    url: str
    env: dict[str, str]
    api: Proc
    worker: Proc
    redis: Proc
    redis_port: int
    data: Path
    log_dir: Path

    def post(self, path, body=None, token=TOKENS[0], timeout=30, **kw):
        headers = kw.pop("headers", {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        if body is not None:
            kw["json"] = body
        return requests.post(self.url + path, headers=headers, timeout=timeout, **kw)

    def get(self, path, token=TOKENS[0], timeout=30):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.url + path, headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def hard(model_dir, tmp_path_factory) -> Hard:
    """A stack of its own: Redis with an append-only file (so a restart keeps state), one worker,
    gunicorn with a small pending bound so overload shows as 429."""
    log_dir = tmp_path_factory.mktemp("hard-logs")
    data = tmp_path_factory.mktemp("hard-data")
    port = free_port()
    redis_proc, url = start_redis(log_dir, port=port, data_dir=data / "redis")
    env = base_env(REDIS_URL=url, MODELS=f"tiny={model_dir},broken={data}/missing-model",
                   ACCESS_TOKEN=",".join(TOKENS), SYNC_TIMEOUT=str(SYNC_TIMEOUT), MAX_DOCUMENTS="64",
                   MAX_REQUEST_BYTES="262144", MAX_PENDING_TOKENS="16000", HEARTBEAT_INTERVAL="0.5",
                   VISIBILITY_TIMEOUT="5", WORKER_CONCURRENCY="16", DATA_DIR=str(data), JOB_PIECE_PAIRS="40",
                   LOG_LEVEL="INFO")
    worker = start_worker("hard-worker", env, log_dir, "tiny")
    api, api_url = start_api("hard-api", env, log_dir)
    stack = Hard(api_url, env, api, worker, redis_proc, port, data, log_dir)
    yield stack
    for proc in (stack.api, stack.worker, stack.redis):
        proc.stop()


def body(rng: random.Random) -> tuple[str, dict]:
    """A mixed synchronous call: FastGPT, Cohere options, chunking, or TEI's route."""
    docs = [sentence(rng, rng.randint(1, 30)) for _ in range(rng.randint(1, 30))]
    kind = rng.random()
    if kind < 0.15:
        return "/rerank", {"query": sentence(rng, 4), "texts": docs, "return_text": rng.random() < 0.5}
    b = {"model": "tiny", "query": sentence(rng, rng.randint(1, 8)), "documents": docs}
    if kind < 0.4:
        b.update(top_n=rng.randint(1, 40), return_documents=True)
    elif kind < 0.5:
        b.update(chunking=True, return_chunks=True)
    return "/v1/rerank", b


# --- load ---------------------------------------------------------------------------------------


def test_load_above_capacity_ends_in_200_or_429_without_memory_growth(hard):
    total = int(os.environ.get("HARDENING_REQUESTS", "10000"))
    time_cap = float(os.environ.get("HARDENING_TIME_CAP", "420"))
    rng = random.Random(42)
    bodies = [body(rng) for _ in range(500)]

    def run(n: int, clients: int) -> tuple[Counter, list[float], list[str]]:
        statuses: Counter = Counter()
        latencies: list[float] = []
        problems: list[str] = []
        lock = threading.Lock()
        counter = iter(range(n))
        deadline = time.monotonic() + time_cap

        def client() -> None:
            with requests.Session() as s:
                s.headers["Authorization"] = f"Bearer {TOKENS[0]}"
                for i in counter:
                    if time.monotonic() > deadline:
                        return
                    path, b = bodies[i % len(bodies)]
                    started = time.monotonic()
                    try:
                        r = s.post(hard.url + path, json=b, timeout=SYNC_TIMEOUT + 10)
                        status = r.status_code
                    except requests.RequestException as exc:
                        status, problem = -1, repr(exc)
                        with lock:
                            problems.append(problem)
                    took = time.monotonic() - started
                    with lock:
                        statuses[status] += 1
                        latencies.append(took)

        with ThreadPoolExecutor(clients) as pool:
            for _ in range(clients):
                pool.submit(client)
        return statuses, latencies, problems

    run(300, 16)  # warm-up: allocators and caches settle before the memory baseline
    api_before, worker_before = rss_mib(hard.api.pid), rss_mib(hard.worker.pid)
    started = time.monotonic()
    statuses, latencies, problems = run(total, 48)
    wall = time.monotonic() - started
    api_after, worker_after = rss_mib(hard.api.pid), rss_mib(hard.worker.pid)
    done = sum(statuses.values())
    p50, p99 = statistics.median(latencies), sorted(latencies)[int(0.99 * (len(latencies) - 1))]
    record("load", "mixed sync calls (FastGPT, Cohere options, chunking, TEI) from 48 clients",
           f"{done} requests in {wall:.0f} s ({done / wall:.0f}/s)",
           f"{statuses[200]} x 200, {statuses[429]} x 429, other: {sum(v for k, v in statuses.items() if k not in (200, 429))}; "
           f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    record("load", "memory before/after the run (RSS)", f"{done} requests",
           f"API {api_before:.0f} -> {api_after:.0f} MiB, worker {worker_before:.0f} -> {worker_after:.0f} MiB "
           f"(bound: +64 MiB)")
    assert not problems, problems[:5]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and done >= min(total, 1000)
    assert max(latencies) < SYNC_TIMEOUT + 5
    assert api_after - api_before < 64 and worker_after - worker_before < 64


# --- faults -------------------------------------------------------------------------------------


class Background:
    """Synchronous callers running while something breaks; records every outcome."""

    def __init__(self, hard: Hard, clients: int = 6) -> None:
        self.hard = hard
        self.outcomes: list[tuple[float, int, float]] = []  # (start, status, seconds)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(clients)]
        self.lock = threading.Lock()

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as s:
            s.headers["Authorization"] = f"Bearer {TOKENS[0]}"
            while not self.stop.is_set():
                path, b = body(rng)
                started = time.monotonic()
                try:
                    status = s.post(self.hard.url + path, json=b, timeout=SYNC_TIMEOUT + 10).status_code
                except requests.RequestException:
                    status = -1
                with self.lock:
                    self.outcomes.append((started, status, time.monotonic() - started))
                time.sleep(0.02)

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def since(self, moment: float) -> list[tuple[float, int, float]]:
        with self.lock:
            return [o for o in self.outcomes if o[0] >= moment]


def submit_job(hard: Hard, items: int, seed: int, token=TOKENS[0]) -> str:
    rng = random.Random(seed)
    lines = [json.dumps({"id": i, "query": sentence(rng, 3), "documents": [sentence(rng, 20) for _ in range(10)]})
             for i in range(items)]  # JSON Lines: a JSON body is held to MAX_REQUEST_BYTES
    r = hard.post("/v1/rerank/jobs", token=token, data="\n".join(lines).encode(),
                  headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job_lines(hard: Hard, job_id: str, token=TOKENS[0]) -> list[dict]:
    r = hard.get(f"/v1/rerank/jobs/{job_id}/results", token=token)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def wait_job(hard: Hard, job_id: str, timeout: float = 180) -> dict:
    def finished():
        r = hard.get(f"/v1/rerank/jobs/{job_id}")
        return r.json() if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout, f"job {job_id}")


def test_worker_sigkill_under_load(hard):
    job = submit_job(hard, 400, seed=1)
    with Background(hard) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        hard.worker.signal(signal.SIGKILL)
        hard.worker.stop()
        time.sleep(SYNC_TIMEOUT + 2)
        restarted_at = time.monotonic()
        hard.worker = start_worker("hard-worker-2", hard.env, hard.log_dir, "tiny")
        ready_at = time.monotonic()
        time.sleep(3)
    during = load.since(killed_at)
    down = [o for o in during if o[0] < restarted_at]
    after = [o for o in load.since(ready_at + 1.5)]
    final = wait_job(hard, job)
    lines = job_lines(hard, job)
    assert all(status in (200, 429, 503, 504) for _, status, _ in during), Counter(s for _, s, _ in during)
    assert all(took < SYNC_TIMEOUT + 2 for _, _, took in down)
    assert after and all(status in (200, 429) for _, status, _ in after)
    assert final["status"] == "succeeded" and [x["id"] for x in lines] == list(range(400))
    record("faults", "SIGKILL the worker under load, start another",
           f"{len(down)} calls while it was down; a 400-item job running",
           f"{dict(Counter(s for _, s, _ in down))}, each within {max(t for _, _, t in down) * 1000:.0f} ms; "
           f"all {len(after)} calls after the restart 200/429; job: 400/400 items, none lost or doubled")


def test_redis_restart_under_load(hard):
    job = submit_job(hard, 300, seed=2)
    client = redis.Redis.from_url(hard.env["REDIS_URL"])
    wait_for(lambda: client.hget(f"rerank:job:{job}", "status") == b"running"
             or client.hget(f"rerank:job:{job}", "status") == b"succeeded", 60, "the job to run")
    with Background(hard) as load:
        time.sleep(1.5)
        assert hard.redis.stop() == 0  # SIGTERM: Redis writes its append-only file and exits
        stopped_at = time.monotonic()
        time.sleep(4)
        back_at = time.monotonic()
        hard.redis, _ = start_redis(hard.log_dir, port=hard.redis_port, data_dir=hard.data / "redis")
        recovered = wait_for(lambda: hard.post("/v1/rerank", {"query": "q", "documents": ["x"]}).status_code == 200
                             and time.monotonic(), 60, "the API to recover by itself")
        time.sleep(2)
    down = [o for o in load.since(stopped_at) if o[0] < back_at - 0.5]
    final = wait_job(hard, job)
    assert down and all(status == 503 for _, status, _ in down), Counter(s for _, s, _ in down)
    assert all(took < SYNC_TIMEOUT + 2 for _, _, took in down)
    assert final["status"] == "succeeded" and len(job_lines(hard, job)) == 300
    assert hard.worker.popen.poll() is None and hard.api.popen.poll() is None  # no process restarted
    record("faults", "stop Redis under load for 4 s, start it again (same data)",
           f"{len(down)} calls while it was down",
           f"all 503, each within {max(t for _, _, t in down) * 1000:.0f} ms; API and worker recovered by themselves "
           f"{recovered - back_at:.1f} s after Redis returned; a 300-item job kept its state and finished")


def test_api_stopped_mid_job(hard):
    job = submit_job(hard, 600, seed=3)
    hard.api.stop()
    client = redis.Redis.from_url(hard.env["REDIS_URL"])
    wait_for(lambda: client.hget(f"rerank:job:{job}", "status") == b"succeeded", 180, "the job without an API")
    hard.api, hard.url = start_api("hard-api-2", hard.env, hard.log_dir)
    final = wait_job(hard, job)
    lines = job_lines(hard, job)
    assert final["status"] == "succeeded" and [x["index"] for x in lines] == list(range(600))
    record("faults", "stop the API right after a job is accepted, start it again", "a 600-item job",
           "the workers finished it meanwhile; 600/600 results readable from the new API")


def test_model_that_fails_to_load_refuses_work_visibly(hard):
    worker = start_worker("hard-broken", hard.env, hard.log_dir, "broken", wait=False)
    code = wait_for(lambda: worker.popen.poll(), 60, "the broken worker to exit")
    worker.stop()
    r = hard.post("/v1/rerank", {"model": "broken", "query": "q", "documents": ["x"]})
    assert code == 3 and r.status_code == 503
    record("faults", "a worker whose model cannot load", "1 worker",
           f"exits with status 3 before taking work; calls for that model get 503 at once ({r.elapsed.total_seconds() * 1000:.0f} ms)")


# --- bad input ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
nasty_text = st.sampled_from(["", " ", "</s><s>", "<pad><mask>", "\x00\x01\x1f", "\ud7ff", "😀" * 100,
                              "a" * 100_000, "Ω≈ç√∫", "\u202e evil", "<script>", "%s%n", "null"])
field_values = json_values | nasty_text | st.integers(min_value=-(2**70), max_value=2**70)


@st.composite
def mutated_bodies(draw) -> bytes:
    base = {"model": "tiny", "query": "q", "documents": ["a", "b"], "top_n": 1, "return_documents": False,
            "raw_scores": False, "chunking": False}
    choice = draw(st.integers(0, 6))
    if choice == 0:  # a field of the wrong type or a strange value
        key = draw(st.sampled_from(sorted(base)))
        base[key] = draw(field_values)
    elif choice == 1:
        base["documents"] = draw(st.lists(field_values, max_size=8))
    elif choice == 2:
        return json.dumps(draw(json_values)).encode()
    elif choice == 3:  # broken JSON, invalid UTF-8, NaN and Infinity
        return draw(st.sampled_from([b"{", b'{"query": "q", "documents": ["a"]', b"\xff\xfe\xfa",
                                     b'{"query": "\xc3\x28", "documents": ["a"]}', b'{"query": NaN}',
                                     b'{"query": "q", "documents": ["a"], "top_n": Infinity}',
                                     b"[" * 100_000, b'{"a":' * 50_000, b"", b"null", b"0"]))
    elif choice == 4:
        base["top_n"] = draw(st.sampled_from([-1, 0, 2**63, -(2**63), 1e308, "5", True, None]))
    elif choice == 5:
        base["query"] = draw(nasty_text)
        base["documents"] = [draw(nasty_text) for _ in range(draw(st.integers(1, 4)))]
    else:
        base["chunking"] = draw(st.sampled_from([{"overlap": -1}, {"overlap": 10**9}, {"max_chunks": 0}, "yes",
                                                 {"overlap": 5, "max_chunks": 2}]))
    return json.dumps(base).encode()


@settings(max_examples=int(os.environ.get("HARDENING_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=mutated_bodies(), route=st.sampled_from(["/v1/rerank", "/rerank", "/v1/rerank/jobs"]))
def test_fuzzed_bodies_get_a_clear_4xx_never_a_5xx(hard, data, route):
    if route == "/rerank" and data.startswith(b"{"):
        data = data.replace(b'"documents"', b'"texts"')
    r = requests.post(hard.url + route, data=data, timeout=SYNC_TIMEOUT + 10,
                      headers={"Authorization": f"Bearer {TOKENS[0]}", "Content-Type": "application/json"})
    assert r.status_code < 500 or r.status_code in (503, 504) and "worker" not in r.text, r.text
    assert r.status_code in (200, 202, 400, 404, 413, 422, 429), (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()
        assert err["error"] and err["error_type"]


def test_big_and_many_inputs_are_refused_cleanly(hard):
    cases = {
        "100 000 documents": hard.post("/v1/rerank", data=json.dumps({"query": "q", "documents": ["d"] * 100_000}),
                                       headers={"Content-Type": "application/json", "Connection": "close"}),
        "65 documents (limit 64)": hard.post("/v1/rerank", {"query": "q", "documents": ["d"] * 65}),
        "a 1 MB string": hard.post("/v1/rerank", {"query": "q", "documents": ["x" * 1_000_000]},
                                   headers={"Connection": "close"}),
        "an empty query": hard.post("/v1/rerank", {"query": "", "documents": ["d"]}),
        "top_n = -5": hard.post("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": -5}),
    }
    statuses = {name: r.status_code for name, r in cases.items()}
    assert statuses == {"100 000 documents": 413, "65 documents (limit 64)": 413, "a 1 MB string": 413,
                        "an empty query": 422, "top_n = -5": 422}
    special = hard.post("/v1/rerank", {"query": "</s><s>", "documents": ["</s><s><pad>", "\x00", "<mask>" * 50]})
    assert special.status_code == 200
    assert hard.worker.popen.poll() is None
    record("bad input", "oversized and malformed bodies", ", ".join(cases),
           "413/422 with a JSON error each; special-token text is scored as text (200)")


def test_worker_survives_the_fuzzing(hard):
    assert hard.worker.popen.poll() is None
    r = hard.post("/v1/rerank", {"query": "still alive?", "documents": ["yes"]})
    assert r.status_code == 200
    examples = os.environ.get("HARDENING_FUZZ_EXAMPLES", "150")
    record("bad input", "hypothesis: mutated bodies on /v1/rerank, /rerank and jobs (wrong types, huge and "
           "special-token strings, deep nesting, invalid UTF-8, NaN/Infinity, bad top_n)",
           f"{examples} bodies", "every answer 2xx/4xx with a JSON error; no 5xx; the worker never restarted")


def test_schemathesis_against_the_openapi_document(hard):
    import schemathesis
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(hard.url + "/openapi.json")
    failures: list[str] = []
    calls = 0
    for op in schema.get_all_operations():
        operation = op.ok()
        if operation.path.endswith("/results") or operation.method.upper() == "DELETE":
            continue  # their inputs are job ids: covered by the jobs tests

        @settings(max_examples=int(os.environ.get("HARDENING_SCHEMA_EXAMPLES", "25")), deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal calls
            calls += 1
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKENS[0]}"}
            try:
                response = case.call(base_url=hard.url, timeout=SYNC_TIMEOUT + 10)
                # 503 is by design where a served model ("broken" here) has no worker: /ready says so.
                expected_503 = response.status_code == 503 and ("worker for" in response.text
                                                                or "no worker" in response.text)
                if response.status_code >= 500 and not expected_503:
                    failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]}")
                case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                          response_schema_conformance])
            except Exception as exc:  # collect, so one run reports every operation
                failures.append(f"{case.method} {case.path}: {str(exc)[:400]}")

        check()
    assert not failures, failures[:5]
    assert hard.worker.popen.poll() is None
    record("bad input", "schemathesis: requests generated from /openapi.json for every operation",
           f"{calls} requests", "no 5xx; every status documented")


# --- security -----------------------------------------------------------------------------------


def protected_operations(hard: Hard) -> list[tuple[str, str]]:
    doc = requests.get(hard.url + "/openapi.json", timeout=5).json()
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if op.get("security"):
                ops.append((method.upper(), path.replace("{job_id}", "job_" + "0" * 32)))
    return ops


# Bad tokens on every protected route: tests/test_requests.py (the API decides them alone).


def test_scheme_in_any_case_is_accepted(hard):
    for scheme in ("Bearer", "bearer", "BEARER", "bEARer"):
        r = requests.get(hard.url + "/v1/models", headers={"Authorization": f"{scheme} {TOKENS[1]}"}, timeout=5)
        assert r.status_code == 200
    record("security", "missing, empty, wrong, padded and other-scheme tokens on every protected route",
           f"{len(protected_operations(hard))} operations x 10 headers",
           "all 401, token never echoed; 'bearer' in any letter case accepted")


def test_pickled_message_is_rejected_not_executed(hard, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    client = redis.Redis.from_url(hard.env["REDIS_URL"])
    body = pickle.dumps(((Exploit(),), {}, {}))
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {"lang": "py", "task": "rerank.realtime", "id": str(uuid.uuid4()), "retries": 0,
                    "root_id": None, "parent_id": None, "group": None, "argsrepr": "()", "kwargsrepr": "{}"},
        "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "rerank.tiny.realtime"},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }
    client.lpush("rerank.tiny.realtime", json.dumps(message))
    wait_for(lambda: "untrusted content" in hard.worker.log_tail(2000) or "ContentDisallowed" in
             hard.worker.log_tail(2000), 20, "the worker to refuse the message")
    time.sleep(0.5)
    assert not marker.exists()
    assert hard.worker.popen.poll() is None
    assert hard.post("/v1/rerank", {"query": "q", "documents": ["x"]}).status_code == 200
    record("security", "a pickled Celery message that would run a shell command", "1 message",
           "refused before deserialising (JSON only); nothing ran; the worker kept serving")


def test_jobs_are_unguessable_and_private_to_their_token(hard):
    ids = {submit_job(hard, 1, seed=i) for i in range(20)}
    assert len(ids) == 20 and all(len(i) == 36 and int(i[4:], 16) >= 0 for i in ids)
    job = sorted(ids)[0]
    assert hard.get(f"/v1/rerank/jobs/{job}", token=TOKENS[1]).status_code == 404
    assert hard.get(f"/v1/rerank/jobs/{job}/results", token=TOKENS[1]).status_code == 404
    assert hard.get(f"/v1/rerank/jobs/{job}", token=TOKENS[0]).status_code == 200
    record("security", "job ids and job visibility", "20 jobs, 2 tokens",
           "128 random bits per id; another token's job is 404 for status and results")


def test_body_size_limits_hold(hard):
    big = b'{"query": "q", "documents": ["' + b"x" * 300_000 + b'"]}'
    for path in ("/v1/rerank", "/rerank"):
        r = hard.post(path, data=big, headers={"Content-Type": "application/json", "Connection": "close"})
        assert r.status_code == 413, (path, r.status_code)


def test_redis_credentials_in_the_url_work(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("auth-redis")
    port = free_port()
    proc = Proc(f"redis-pw-{port}", [__import__("rerank.launch", fromlist=["x"]).redis_server_binary(),
                                      "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                      "--requirepass", "s3cr3t-pw"], base_env(), log_dir)
    try:
        good = f"redis://:s3cr3t-pw@127.0.0.1:{port}/0"
        wait_for(lambda: redis.Redis.from_url(good).ping(), 15, "redis with a password", proc)
        env = base_env(REDIS_URL=good, MODELS=f"tiny={model_dir}", HEARTBEAT_INTERVAL="0.5")
        worker = start_worker("pw-worker", env, log_dir, "tiny")
        api, url = start_api("pw-api", env, log_dir)
        bad_api, bad_url = start_api("pw-api-bad", dict(env, REDIS_URL=f"redis://:wrong@127.0.0.1:{port}/0"), log_dir)
        try:
            assert requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["x"]}, timeout=10).status_code == 200
            assert requests.post(bad_url + "/v1/rerank", json={"query": "q", "documents": ["x"]},
                                 timeout=10).status_code == 503
            logs = "".join(p.log_path.read_text() for p in (worker, api, bad_api))
            assert "s3cr3t-pw" not in logs
        finally:
            for p in (bad_api, api, worker):
                p.stop()
    finally:
        proc.stop()
    record("security", "REDIS_URL with a password", "API + worker",
           "works; a wrong password is a 503; the password never appears in a log")


def test_tokens_never_reach_logs(hard):
    logs = "".join(p.read_text(errors="replace") for p in hard.log_dir.glob("*.log"))
    for token in TOKENS:
        assert token not in logs
    record("security", "tokens in logs and error bodies", f"{len(logs) // 1024} KiB of logs of this suite",
           "no token anywhere")
