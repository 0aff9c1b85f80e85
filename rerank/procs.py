"""Starting and stopping the real processes that the tests and the benchmarks talk to: Redis,
workers, gunicorn. One definition for both (tests/procs.py re-exports it; bench/ imports it from
here, never from tests/)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
import requests

from rerank.launch import free_port, redis_argv, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], timeout: float, what: str, proc: "Proc | None" = None):
    """Poll until `predicate()` is truthy; fail with the process log if it dies first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # not up yet
            pass
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            extra = f"\n{proc.log_tail()}" if proc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(0.05)


class Proc:
    """A child process with its output in a log file; `stop()` never leaves it behind."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 10) -> int:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def base_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCESS_TOKEN", "MODELS", "REDIS_URL")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(overrides)
    return env


def start_redis(log_dir: Path, port: int | None = None, data_dir: Path | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    if data_dir is not None:  # the launcher's own Redis, append-only file and all
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = redis_argv(data_dir, port, logfile=False)
    else:
        argv = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no"]
    proc = Proc(f"redis-{port}", argv, base_env(), log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_for(client.ping, 15, "redis", proc)
    return proc, url


def start_worker(name: str, env: dict[str, str], log_dir: Path, model: str, *, wait: bool = True,
                 code: Path = ROOT) -> Proc:
    """`code`: the source tree the worker runs (another commit's, for a side-by-side benchmark)."""
    proc = Proc(name, [sys.executable, "-m", "worker", "--model", model], env, log_dir, cwd=code)
    if wait:
        client = redis_for(env)
        wait_for(lambda: client.scard(f"rerank:workers:{model}") and _alive(client, model, proc.pid),
                 60, f"worker {name}", proc)
    return proc


def redis_for(env: dict[str, str]) -> redis.Redis:
    """A client of the Redis the processes of `env` use (REDIS_URL may name Sentinels)."""
    from shared import redis_client
    from shared.settings import Settings

    settings = Settings(redis_url=env["REDIS_URL"], redis_master_name=env.get("REDIS_MASTER_NAME", "mymaster"))
    return redis_client.connect(settings, socket_connect_timeout=2, socket_timeout=5)


def _alive(client: redis.Redis, model: str, pid: int) -> bool:
    from shared.workers import WorkerRegistry

    return any(w["pid"] == pid for w in WorkerRegistry(client).alive(model, fresh=True))


def start_api(name: str, env: dict[str, str], log_dir: Path, code: Path = ROOT) -> tuple[Proc, str]:
    port = free_port()
    env = dict(env, PORT=str(port), HOST="127.0.0.1")
    env.setdefault("API_WORKERS", "1")
    proc = Proc(name, [sys.executable, "-m", "gunicorn", "-c", str(code / "api" / "gunicorn.conf.py")], env, log_dir,
                cwd=code)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(url + "/health", timeout=1).ok, 30, name, proc)
    return proc, url
