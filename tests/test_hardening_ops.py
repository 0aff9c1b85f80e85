"""Operations under hostile clients and hard faults: stalled connections, a full disk, Redis out of
memory, a crash-looping worker, a killed worker holding work, odd JSON (issue 15).

Each test starts the real parts (gunicorn, Celery workers, Redis, the launcher) and records what
it tried and what came out; tests/conftest.py prints the figures after the run, docs/operations.md keeps them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from rerank.launch import free_port, redis_argv
from rerank.random_model import sentence
from tests.procs import ROOT, Proc, base_env, start_api, start_worker, wait_for
from tests.test_hardening import record
from tests.test_launcher import processes_marked, stop_marked

pytestmark = [pytest.mark.stack, pytest.mark.hardening]


# --- stalled and idle connections (slowloris) --------------------------------------------------


def _open_stalled(port: int, n: int) -> list[socket.socket]:
    """n connections: idle, one byte sent, headers cut short, or a body that stops after one byte."""
    starts = [b"", b"P", b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n",
              b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"]
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if starts[i % 4]:
            s.sendall(starts[i % 4])
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1024) is not None  # b"" (closed) or an error answer: the server let go
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_500_stalled_connections_do_not_stop_calls_or_health(stack_env, worker, log_dir):
    env = dict(stack_env, API_WORKERS="1", CLIENT_TIMEOUT="2")  # one process holds all 500
    api, url = start_api("api-slowloris", env, log_dir)
    port = int(url.rsplit(":", 1)[1])
    auth = {"Authorization": f"Bearer {stack_env['ACCESS_TOKEN'].split(',')[0]}"}
    body = {"query": "what is a panda?", "documents": ["a bear", "a car"]}
    socks = _open_stalled(port, 500)
    try:
        time.sleep(0.5)
        timings: list[tuple[str, int, float]] = []
        for _ in range(5):
            for path in ("/health", "/v1/rerank"):
                started = time.monotonic()
                r = (requests.get(url + path, timeout=10) if path == "/health"
                     else requests.post(url + path, json=body, headers=auth, timeout=10))
                timings.append((path, r.status_code, time.monotonic() - started))
        # FastGPT's fan-out beside them: 64 calls at once.
        results: list[int] = []

        def call() -> None:
            results.append(requests.post(url + "/v1/rerank", json=body, headers=auth, timeout=30).status_code)

        started = time.monotonic()
        threads = [threading.Thread(target=call) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fan_out = time.monotonic() - started
        assert all(status == 200 for _, status, _ in timings), timings
        assert results == [200] * 64, Counter(results)
        # The server lets go of them: header stalls after `keepalive` (5 s), body stalls after CLIENT_TIMEOUT.
        body_stalls = socks[3::4]
        wait_for(lambda: all(_closed_by_server(s) for s in body_stalls), 15, "body stalls to be cut off")
        header_stalls = socks[1::4] + socks[2::4]
        wait_for(lambda: all(_closed_by_server(s) for s in header_stalls), 15, "header stalls to be cut off")
    finally:
        for s in socks:
            s.close()
        api.stop()
    worst = {p: max(t for q, _, t in timings if q == p) * 1000 for p in ("/health", "/v1/rerank")}
    record("slow clients", "500 connections held open against one API process: idle, one byte, headers cut "
           "short, body stalled (slowloris)", "500 connections; 10 calls and 64 concurrent calls beside them",
           f"all 200: /health within {worst['/health']:.0f} ms, calls within {worst['/v1/rerank']:.0f} ms, "
           f"64 concurrent calls in {fan_out:.2f} s; stalled connections cut off (headers after 5 s, "
           f"body after CLIENT_TIMEOUT)")


# --- a full disk, Redis out of memory --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs of the test's own (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _disk_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _fill(path: Path) -> Path:
    """Write until the disk is full (again: space freed since, e.g. by an append-only file rewrite
    that finished after the last fill, is taken too)."""
    filler = path / "filler"
    with open(filler, "ab") as f:
        try:
            while True:
                f.write(b"\0" * (256 * 1024))
                f.flush()
        except OSError:
            pass
    return filler


def test_full_disk_and_redis_out_of_memory_are_named_and_recovered_from(model_dir, small_disk, tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    port = free_port()
    redis_proc = Proc("redis-small-disk", redis_argv(small_disk, port, logfile=False), base_env(), log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_for(client.ping, 15, "redis", redis_proc)
    env = base_env(REDIS_URL=url, MODELS=f"tiny={model_dir}", SYNC_TIMEOUT="10", MAX_DOCUMENTS="256",
                   MAX_REQUEST_BYTES=str(2 * 1024 * 1024), HEARTBEAT_INTERVAL="0.5", WORKER_CONCURRENCY="4",
                   TORCH_THREADS="1", DATA_DIR=str(tmp_path / "data"))
    worker = start_worker("worker-small-disk", env, log_dir, "tiny")
    api, api_url = start_api("api-small-disk", env, log_dir)
    pids = (redis_proc.pid, worker.pid, api.pid)
    try:
        # 1. Realtime payloads pass through the append-only file, which is compacted: calls writing
        #    twice the disk's size to it leave the disk far from full.
        import random

        rng = random.Random(7)
        docs = [" ".join(sentence(rng, 40) for _ in range(70))[:16_000] for _ in range(16)]  # 256 KB a call
        call = {"query": "panda", "documents": docs}
        before = client.info("persistence")["aof_current_size"]
        first = requests.post(api_url + "/v1/rerank", json=call, timeout=30)
        per_call = client.info("persistence")["aof_current_size"] - before  # no rewrite yet: the file only grew
        calls = 2 * 24 * 2**20 // per_call + 1
        peak, sampling = [_disk_used(small_disk)], threading.Event()

        def sample() -> None:
            while not sampling.wait(0.01):
                peak.append(_disk_used(small_disk))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(2) as pool:  # two at a time: the worker tokenizes on both cores
                statuses = Counter([first.status_code] + list(pool.map(
                    lambda _: requests.post(api_url + "/v1/rerank", json=call, timeout=30).status_code,
                    range(calls - 1))))
        finally:
            sampling.set()
            sampler.join()
        assert statuses == Counter({200: calls}), statuses
        assert max(peak) < 22 * 2**20, max(peak)

        # 2. The disk fills: Redis refuses writes; calls and /ready say so. A rewrite of the
        #    append-only file that ends after the fill would free the old file's space: let it end,
        #    and fill again whatever space comes back while the calls go on.
        wait_for(lambda: not any(client.info("persistence")[k] for k in ("aof_rewrite_in_progress",
                                                                         "aof_rewrite_scheduled")),
                 30, "the append-only file rewrite to end")
        filler = _fill(small_disk)
        outage = Counter()
        reasons = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _fill(small_disk)
            r = requests.post(api_url + "/v1/rerank", json={"query": "q", "documents": ["x"]}, timeout=10)
            outage[r.status_code] += 1
            if r.status_code == 503:
                reasons.add(r.json()["error"])
            if any("cannot write" in x for x in reasons) and outage[503] >= 3:
                break
        ready = requests.get(api_url + "/ready", timeout=10)
        assert set(outage) <= {200, 503, 504}, outage
        assert any("Redis cannot write to its disk (No space left on device)" in x for x in reasons), reasons
        assert not any("unreachable" in x for x in reasons), reasons
        assert ready.status_code == 503 and ready.json()["redis"] == "cannot_write", ready.text

        # 3. Space returns: everything serves again by itself, no process restarted.
        filler.unlink()
        freed = time.monotonic()
        wait_for(lambda: requests.post(api_url + "/v1/rerank", json={"query": "q", "documents": ["x"]},
                                       timeout=10).status_code == 200, 30, "calls to succeed again")
        recovered = time.monotonic() - freed
        assert requests.get(api_url + "/ready", timeout=10).status_code == 200

        # 4. Redis out of memory: named as such, /ready 503, and recovered from.
        client.config_set("maxmemory", "1")
        try:
            oom = [requests.post(api_url + "/v1/rerank", json={"query": "q", "documents": ["x"]}, timeout=10)
                   for _ in range(3)]
            oom_ready = requests.get(api_url + "/ready", timeout=10)
        finally:
            client.config_set("maxmemory", "0")
        assert all(r.status_code == 503 and "out of memory" in r.json()["error"] for r in oom), [r.text for r in oom]
        assert oom_ready.status_code == 503 and oom_ready.json()["redis"] == "out_of_memory", oom_ready.text
        wait_for(lambda: requests.post(api_url + "/v1/rerank", json={"query": "q", "documents": ["x"]},
                                       timeout=10).status_code == 200, 30, "calls to succeed after OOM")
        assert (redis_proc.popen.poll(), worker.popen.poll(), api.popen.poll()) == (None, None, None)
        assert (redis_proc.pid, worker.pid, api.pid) == pids
    finally:
        api.stop()
        worker.stop()
        redis_proc.stop()
    record("disk", "realtime calls through the launcher's Redis (append-only file) on a 24 MiB disk",
           f"{calls} calls of {len(first.request.body) // 1024} KB, {calls * per_call / 2**20:.0f} MiB written to "
           f"the append-only file ({per_call / len(first.request.body):.1f} x the body)",
           f"all 200; disk use peaked at {max(peak) / 2**20:.1f} MiB (the file is compacted past 8 MB)")
    record("disk", "the disk fills up under calls, then space returns",
           f"{sum(outage.values())} calls while full",
           f"{dict(outage)}: 503 'Redis cannot write to its disk (No space left on device)', /ready 503 "
           f"cannot_write; serving again {recovered:.1f} s after space returned, no process restarted")
    record("memory", "Redis at maxmemory (noeviction)", "3 calls",
           "503 'Redis is out of memory', /ready 503 out_of_memory; served again once memory was raised")


# --- a worker in a crash loop --------------------------------------------------------------------


def test_crash_looping_worker_is_retried_with_backoff_and_never_stops_the_rest(model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()  # no weights: the worker exits at once (status 3), again and again
    port, mark = free_port(), uuid.uuid4().hex
    env = base_env(MODELS=f"tiny={model_dir},broken={broken}", PORT=str(port), DATA_DIR=str(tmp_path / "data"),
                   API_WORKERS="1", WORKER_CONCURRENCY="4", HEARTBEAT_INTERVAL="0.5", TORCH_THREADS="1",
                   WORKER_RESTART_MAX_DELAY="2", TEST_MARK=mark)
    log_path = tmp_path / "up.log"
    log = open(log_path, "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "rerank", "up"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "rerank-service ready" in log_path.read_text(), 120, "the banner")
        assert "Not served yet" in log_path.read_text() and "broken" in log_path.read_text()
        api_and_redis = sorted(p for p in processes_marked(mark)
                               if "gunicorn" in _cmdline(p) or "redis-server" in _cmdline(p))
        # The engine holds the model's memory: the kernel's out-of-memory killer would pick it.
        tiny = [p for p in processes_marked(mark) if "-m\0engine\0--model\0tiny\0" in _cmdline(p)]
        assert tiny and api_and_redis
        os.kill(tiny[0], signal.SIGKILL)
        wait_for(lambda: log_path.read_text().count("could not load its model") >= 3, 60, "three deaths")
        wait_for(lambda: requests.post(base + "/v1/rerank", json={"model": "tiny", "query": "q", "documents": ["x"]},
                                       timeout=10).status_code == 200, 60, "tiny served again after the kill")
        bad = requests.post(base + "/v1/rerank", json={"model": "broken", "query": "q", "documents": ["x"]},
                            timeout=10)
        ready = requests.get(base + "/ready", timeout=10)
        assert bad.status_code == 503 and "no worker" in bad.json()["error"], bad.text
        assert ready.status_code == 503 and ready.json()["missing"] == ["worker for broken"]
        assert "engine[tiny@cpu] was killed by SIGKILL" in log_path.read_text()
        delays = [line.split("restarting it in ")[1].split("s")[0] for line in log_path.read_text().splitlines()
                  if "engine[broken" in line and "restarting it in" in line]
        assert delays[:3] == ["0", "1", "2"], delays  # doubling, up to WORKER_RESTART_MAX_DELAY
        assert set(api_and_redis) <= set(processes_marked(mark))  # neither was restarted

        # The model folder is repaired: a later retry holds and the model is served, no restart of the rest.
        for item in model_dir.iterdir():
            shutil.copy(item, broken / item.name)
        fixed_at = time.monotonic()
        wait_for(lambda: requests.post(base + "/v1/rerank", json={"model": "broken", "query": "q", "documents": ["x"]},
                                       timeout=10).status_code == 200, 60, "the repaired model to be served")
        served_after = time.monotonic() - fixed_at
        assert launcher.poll() is None and set(api_and_redis) <= set(processes_marked(mark))
        deaths = log_path.read_text().count("could not load its model")
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
    finally:
        stop_marked(launcher, mark)
        log.close()
    record("faults", "a worker whose model folder is empty (dies at start, again and again), and a worker "
           "SIGKILLed as the OOM killer would", f"{deaths} deaths of one worker, 1 kill of the other",
           f"restarted after {', '.join(delays)} … s (WORKER_RESTART_MAX_DELAY=2 here, 60 by default); the API, Redis and "
           f"the other model kept serving, 503 for the broken model; served {served_after:.1f} s after its "
           "folder was repaired")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


# --- a killed worker's held work ------------------------------------------------------------------


def test_killed_worker_holding_job_pieces_has_them_handed_out_within_a_minute(small_pieces_api, log_dir, redis_url):
    multi_api = small_pieces_api  # pieces of 200 pairs: the victim holds several when it dies
    # VISIBILITY_TIMEOUT is left at its 900 s default: only the heartbeat-based redelivery can help.
    env = {k: v for k, v in multi_api.env.items() if k != "VISIBILITY_TIMEOUT"}
    env.update(REDELIVER_AFTER="3", WORKER_CONCURRENCY="4")
    client = redis.Redis.from_url(redis_url)
    victim = start_worker("worker-spare-held", env, log_dir, "spare")
    rng = __import__("random").Random(11)
    items = [{"id": i, "query": sentence(rng, 3), "documents": [sentence(rng, 20) for _ in range(12)]}
             for i in range(400)]
    r = multi_api.session.post(f"{multi_api.url}/v1/rerank/jobs?model=spare", timeout=30,  # JSON Lines: a JSON
                               data="".join(json.dumps(i) + "\n" for i in items).encode(),  # body is held to
                               headers={"Content-Type": "application/jsonl"})  # MAX_REQUEST_BYTES
    assert r.status_code == 202, r.text
    job = r.json()["id"]

    def held() -> int:
        ids = [m.decode() for m in client.zrange("rerank:holders", 0, -1)]
        mine = [i for i in ids if f"-{victim.pid}-" in i]
        return sum(client.scard(f"rerank:held:{i}") for i in mine)

    wait_for(lambda: client.hget(f"rerank:job:{job}", "items_done") not in (None, b"0") and held() >= 2,
             60, "the victim to hold pieces mid-job")
    holding = held()
    victim.signal(signal.SIGKILL)
    victim.stop()
    killed_at = time.monotonic()
    rescuer = start_worker("worker-spare-rescuer-held", env, log_dir, "spare")
    try:
        wait_for(lambda: client.hget(f"rerank:job:{job}", "status") in (b"succeeded", b"failed"), 60,
                 "the job to finish within a minute of the kill")
        finished_in = time.monotonic() - killed_at
        assert "handed out again" in rescuer.log_tail(2000)
    finally:
        rescuer.stop()
    state = {k.decode(): v.decode() for k, v in client.hgetall(f"rerank:job:{job}").items()}
    lines = [json.loads(x) for x in multi_api.session.get(f"{multi_api.url}/v1/rerank/jobs/{job}/results",
                                                           timeout=30).text.splitlines()]
    assert state["status"] == "succeeded" and int(state["items_done"]) == 400 and int(state["pieces_done"]) == int(
        state["pieces_total"]), state
    assert [x["id"] for x in lines] == list(range(400))  # every item once, in order
    record("faults", "SIGKILL a worker holding job pieces, VISIBILITY_TIMEOUT left at 900 s",
           f"a 400-item job; {holding} unacknowledged pieces held by the killed worker",
           f"another worker handed them out again (REDELIVER_AFTER=3 here, 30 by default) and the job finished "
           f"{finished_in:.0f} s after the kill: 400/400 items, each counted once")


# --- odd but valid JSON, and the API's temp folder -------------------------------------------------


def test_lone_surrogates_are_scored_as_replacement_characters(api):
    raw = b'{"query": "panda \\ud800", "documents": ["a \\udc00 bear", "\\ud83d\\ude00 ok", "plain"]}'
    fixed = {"query": "panda \ufffd", "documents": ["a \ufffd bear", "\U0001F600 ok", "plain"]}
    r = api.post("/v1/rerank", data=raw, headers={"Content-Type": "application/json"})
    same = api.post("/v1/rerank", fixed)
    tei = api.post("/rerank", data=raw.replace(b'"documents"', b'"texts"'), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and tei.status_code == 200, (r.text, tei.text)
    assert r.json()["results"] == same.json()["results"]
    assert api.post("/v1/rerank", data=b'{"query": "\\\\ud800", "documents": ["x"]}',
                    headers={"Content-Type": "application/json"}).status_code == 200  # an escaped backslash
    record("bad input", "lone UTF-16 surrogates in JSON strings (\"\\ud800\")", "/v1/rerank and /rerank",
           "200, scored as U+FFFD (the same scores as the text with the replacement character)")


def test_api_removes_its_metrics_folder_and_orphans_of_dead_masters(stack_env, worker, log_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"rerank-metrics-{dead.pid}-test"
    orphan.mkdir()
    api, _ = start_api("api-metrics-folder", {k: v for k, v in stack_env.items()
                                               if k != "PROMETHEUS_MULTIPROC_DIR"}, log_dir)
    try:
        own = list(Path(tempfile.gettempdir()).glob(f"rerank-metrics-{api.pid}-*"))
        assert len(own) == 1 and own[0].is_dir()
        assert not orphan.exists()
    finally:
        api.stop()
        shutil.rmtree(orphan, ignore_errors=True)
    assert not own[0].exists()


# --- the pure parts ---------------------------------------------------------------------------------


def test_redis_errors_are_named_by_state():
    from kombu.exceptions import OperationalError

    from shared.redis_state import classify

    script = "Error running script (call to f_1): @user_script:15: @user_script: 15: -{} {}"
    cases = {
        redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"): "cannot_write",
        redis.ResponseError(script.format("MISCONF", "Errors writing to the AOF file: No space left")): "cannot_write",
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.",
                                          status_code="OOM"): "out_of_memory",
        redis.ResponseError(script.format("OOM", "command not allowed when used memory")): "out_of_memory",
        redis.exceptions.ReadOnlyError("You can't write against a read only replica.",
                                       status_code="READONLY"): "read_only",
        redis.AuthenticationError("invalid username-password pair"): "refused",
        redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."): "unreachable",
        OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused."): "unreachable",
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"): "unreachable",
    }
    assert {str(e): classify(e).state for e in cases} == {str(e): state for e, state in cases.items()}
    assert "No space left on device" in classify(next(iter(cases))).reason


def test_lone_surrogate_escapes_are_replaced_and_nothing_else():
    from api.validation import replace_lone_surrogates as fix

    assert fix(rb'["a\ud800b", "\udc00", "\ud83d\ude00", "\\ud800", "\\\ud800"]') == \
        rb'["a\ufffdb", "\ufffd", "\ud83d\ude00", "\\ud800", "\\\ufffd"]'
    assert json.loads(fix(rb'"\ud83d\ud83d\ude00"')) == "\ufffd\U0001F600"


def test_restart_back_off_doubles_up_to_its_cap_and_resets_after_a_stable_run():
    from rerank.launch import STABLE_SECONDS, Child

    child = Child("w", [], {}, restart=True)
    delays = []
    for n in range(7):
        child.started_at = 100.0 + n  # each run dies a second after it started
        delays.append(child.schedule_restart(101.0 + n, max_delay=10))
    assert delays == [0, 1, 2, 4, 8, 10, 10]
    child.started_at = 200.0
    assert child.schedule_restart(200.0 + STABLE_SECONDS, max_delay=10) == 0
