"""The one run command: `python -m rerank up` starts Redis, a worker and the API; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from rerank.launch import free_port
from tests.procs import ROOT, base_env, wait_for

pytestmark = pytest.mark.stack


def processes_marked(mark: str) -> list[int]:
    """Pids of live processes whose environment carries our marker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"TEST_MARK={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "State:\tZ" not in status:
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_marked(launcher, mark: str) -> None:
    """Teardown of a test that ran the launcher: it and every process it started are gone."""
    if launcher.poll() is None:
        launcher.kill()
    for pid in processes_marked(mark):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_up_serves_and_ctrl_c_stops_everything(model_dir, tmp_path):
    port, mark = free_port(), uuid.uuid4().hex
    env = base_env(MODELS=f"tiny={model_dir}", PORT=str(port), DATA_DIR=str(tmp_path / "data"),
                   API_WORKERS="1", WORKER_CONCURRENCY="4", TEST_MARK=mark)
    log = open(tmp_path / "up.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "rerank", "up"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "rerank-service ready" in (tmp_path / "up.log").read_text(), 90, "the banner")
        r = requests.post(f"http://127.0.0.1:{port}/v1/rerank", json={"query": "Hi", "documents": ["Hi"]}, timeout=10)
        assert r.status_code == 200, r.text
        assert len(processes_marked(mark)) >= 4  # launcher, redis, worker, gunicorn (+ its workers)
        assert (tmp_path / "data" / "redis").is_dir()  # Redis keeps its data in DATA_DIR
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
        wait_for(lambda: not processes_marked(mark), 10, "every child to exit")
    finally:
        stop_marked(launcher, mark)
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert "FastGPT rerank URL: http://" in text and f":{port}/v1/rerank" in text
    assert "own Redis on 127.0.0.1" in text
