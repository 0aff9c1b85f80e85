"""What bench/run.py measures, loaded side by side: the model in-process (`Ceiling`), a server
that scores as FastGPT's original bge-rerank server does (`Naive`), and this service end to end
(`Service`: Redis, gunicorn API, Celery workers, an engine process), with the random-weight model
folders they load (`model_dir`). The processes are started with rerank/procs.py's helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

from bench.measure import CPU, Timing, http_caller
from rerank.launch import free_port
from rerank.procs import ROOT, Proc, base_env, start_api, start_redis, start_worker, wait_for
from rerank.random_model import build_model

CACHE = ROOT / "bench" / ".cache"


def model_dir(arch: str, weights: bool = True) -> Path:
    path = CACHE / (arch if weights else f"{arch}-config-only")
    if not (path / "config.json").exists():
        print(f"building a random {arch} model in {path}", flush=True)
        build_model(path, arch, weights=weights)
    return path


def commit_tree(ref: str, folder: Path) -> Path:
    """The source tree of commit `ref` (git archive), extracted into the new folder `folder`: what a
    benchmark runs as "before" to measure a change side by side, in this virtual environment."""
    folder.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def served_env(**overrides: str) -> dict[str, str]:
    """The environment of a measured server: the tests' (rerank/procs.py), less what they pin
    that a deployment leaves alone. TOKENIZERS_PARALLELISM stays the tokenizer's default, as the
    launcher leaves it: a feeder at the default did 1.13-1.15 x the W2 pairs at the same CPU per
    pair as with it off (simulated device, 2-core VM, 2026-12-08), which bench runs before then
    measured."""
    env = base_env(**overrides)
    if "TOKENIZERS_PARALLELISM" not in overrides:
        env.pop("TOKENIZERS_PARALLELISM", None)
        if "TOKENIZERS_PARALLELISM" in os.environ:
            env["TOKENIZERS_PARALLELISM"] = os.environ["TOKENIZERS_PARALLELISM"]
    return env


class Ceiling:
    """The model in-process: the engine without HTTP, queue or processes. On a GPU (or the
    simulated one) pairs are tokenized before the clock starts: the model alone."""

    name = "ceiling"

    def __init__(self, path: Path, device: str, pretokenized: bool, cpu_backend: str = "torch") -> None:
        from engine import Engine, EngineConfig

        self.engine = Engine.start(EngineConfig(source=str(path), device=device, cpu_backend=cpu_backend))
        self.pretokenized = pretokenized

    def call(self, query: str, docs: list[str]) -> int:
        if self.pretokenized:
            encoded = self.engine.encoder.encode(query, docs)
            started = time.perf_counter()
            self.engine.run(encoded)
            self.last = time.perf_counter() - started
        else:
            self.engine.score(query, docs)
        return 200

    def clients(self, per_client: list[list[tuple[str, list[str]]]]) -> Timing:
        """Requests one after another (W1, W3), timing only what the ceiling counts."""
        timing = Timing()
        for requests_ in per_client:
            for query, docs in requests_:
                started = time.perf_counter()
                self.call(query, docs)
                timing.latencies.append(self.last if self.pretokenized else time.perf_counter() - started)
                timing.pairs += len(docs)
        return timing

    def whole(self, requests_: list[tuple[str, list[str]]]) -> Timing:
        """The whole workload as one request (the batcher's best case: a global length sort)."""
        pairs = [(q, d) for q, docs in requests_ for d in docs]
        started = time.perf_counter()
        encoded, _ = self.engine.encoder.encode_pairs(pairs)
        if self.pretokenized:
            started = time.perf_counter()
        self.engine.run(encoded)
        return Timing([], len(pairs), time.perf_counter() - started)

    def close(self) -> None:
        self.engine.stop()


class Naive:
    """FastGPT's original server's way: one request at a time over HTTP, unsorted batches of 256,
    eager passes."""

    name = "naive"

    def __init__(self, path: Path, log_dir: Path, device: str) -> None:
        self.port = free_port()
        env = served_env(MODEL_DIR=str(path), DEVICE=device)
        self.proc = Proc(f"naive-{path.name}", [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "sync",
                                                 "-t", "3600", "-b", f"127.0.0.1:{self.port}",
                                                 "bench.naive_server:create_app()"], env, log_dir)
        self.call = http_caller(f"http://127.0.0.1:{self.port}")
        wait_for(lambda: self.call("warm", ["up"]) or True, 180, "the naive server", self.proc)

    def close(self) -> None:
        self.proc.stop()


class Service:
    """This project end to end: gunicorn API, Redis, Celery workers and an engine process. With
    `feeders`, as the launcher lays it out: one shared engine (`python -m engine`) fed by that many
    workers over its socket; without, one worker with an engine (or the model) of its own."""

    def __init__(self, path: Path, log_dir: Path, device: str, name: str = "service",
                 extra: dict[str, str] | None = None, warm: bool = True, feeders: int | None = None,
                 code: Path = ROOT) -> None:
        """`code`: the source tree its processes run (bench.run --baseline: another commit's)."""
        self.name = name
        self.redis = self.worker = self.api = self.engine = None
        self.feeders: list[Proc] = []
        try:
            self.redis, redis_url = start_redis(log_dir)
            env = served_env(**{"REDIS_URL": redis_url, "MODELS": f"bench={path}", "SYNC_TIMEOUT": "900",
                              "DEVICE": device, "DATA_DIR": str(log_dir / f"data-{name}-{path.name}"),
                              "LOG_LEVEL": "WARNING", "API_WORKERS": "2", "HEARTBEAT_INTERVAL": "0.5",
                              **(extra or {})})
            self.env = env
            self.started = time.perf_counter()
            if feeders:
                self._sockets = tempfile.mkdtemp(prefix="rb-")
                socket_path = os.path.join(self._sockets, "e.sock")
                self.engine = Proc(f"{name}-engine-{path.name}", [sys.executable, "-m", "engine", "--model", "bench",
                                                                  "--socket", socket_path], env, log_dir,
                                   cwd=code)
                feeder_env = dict(env, ENGINE_SOCKET=socket_path)
                self.feeders = [start_worker(f"{name}-feeder{n}-{path.name}", feeder_env, log_dir, "bench",
                                             wait=False, code=code) for n in range(feeders)]
                import redis as redis_lib

                from shared.workers import WorkerRegistry

                registry = WorkerRegistry(redis_lib.Redis.from_url(redis_url))
                wait_for(lambda: len(registry.alive("bench", fresh=True)) == feeders, 300,
                         f"{feeders} feeders of one engine", self.engine)
                self.worker = self.feeders[0]
            else:
                self.worker = start_worker(f"{name}-worker-{path.name}", env, log_dir, "bench", code=code)
            self.api, self.url = start_api(f"{name}-api-{path.name}", env, log_dir, code=code)
            self.ready_after = time.perf_counter() - self.started
            self.call = http_caller(self.url)
            if warm:
                self.call("warm", ["up"])
        except BaseException:
            self.close()  # what did start is stopped
            raise

    def worker_info(self) -> dict:
        import redis as redis_lib

        from shared.workers import WorkerRegistry

        live = WorkerRegistry(redis_lib.Redis.from_url(self.env["REDIS_URL"])).alive("bench", fresh=True)
        (info,) = [w for w in live if w["pid"] == self.worker.pid]
        return info

    def cpu(self) -> CPU:
        """Per process group; with several feeders `worker` is all of them and `feederN` each one."""
        info = self.worker_info()
        feeders = [p.pid for p in self.feeders] or [self.worker.pid]
        groups = {"api": [self.api.pid, *CPU.children(self.api.pid)], "worker": feeders,
                  "redis": [self.redis.pid]}
        if len(feeders) > 1:
            groups.update({f"feeder{n}": [pid] for n, pid in enumerate(feeders)})
        if info.get("engine_pid") and info["engine_pid"] != self.worker.pid:
            groups["engine"] = [info["engine_pid"]]
        return CPU(groups)

    def bulk_job(self, items: list[tuple[str, list[str]]]) -> Timing:
        """Through the job path (JSON Lines upload): submit, poll until done."""
        body = "".join(json.dumps({"query": q, "documents": d}) + "\n" for q, d in items).encode()
        pairs = sum(len(d) for _, d in items)
        started = time.perf_counter()
        r = requests.post(self.url + "/v1/rerank/jobs", data=body, timeout=600,
                          headers={"Content-Type": "application/jsonl"})
        r.raise_for_status()
        accepted = time.perf_counter()
        job = r.json()["id"]
        while True:
            status = requests.get(f"{self.url}/v1/rerank/jobs/{job}", timeout=30).json()
            if status["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        if status["status"] != "succeeded":
            raise RuntimeError(f"bulk job ended {status['status']}: {status}")
        return Timing([], pairs, time.perf_counter() - started, upload=accepted - started)

    def model_counters(self, after: float = 0.0) -> dict[str, float]:
        """The worker's model seconds, pairs, tokens and forward CPU so far, from /metrics
        (published with each heartbeat, so wait for one that started after `after`)."""
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {"rerank_batch_seconds_sum": "model_s", "rerank_pairs_scored_total": "pairs",
                  "rerank_tokens_scored_total": "real_tokens", "rerank_tokens_computed_total": "padded_tokens",
                  "rerank_forward_cpu_seconds_total": "forward_cpu"}
        while time.time() < after + 1.5:  # three heartbeats of 0.5 s
            time.sleep(0.1)
        out = dict.fromkeys(wanted.values(), 0.0)
        text = requests.get(self.url + "/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    out[wanted[sample.name]] += sample.value
        return out

    def close(self) -> None:
        for proc in (self.api, *(self.feeders or [self.worker]), self.engine, self.redis):
            if proc is not None:
                proc.stop()
        if self.engine is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)


def cpu_per_pair(service: Service, run: Callable[[], Timing]) -> tuple[Timing, dict[str, float]]:
    """Run a workload on the service; microseconds of CPU per pair of each of its processes, and
    on a GPU (or the simulated one) of the engine process outside forward passes: its total minus
    its model thread's CPU inside launch and finish. (On a CPU torch's own threads compute the
    pass, so that difference means nothing there and is not reported.)"""
    cpu = service.cpu()
    before, counters = cpu.snapshot(), service.model_counters()
    timing = run()
    after, counters_after = cpu.snapshot(), service.model_counters(after=time.time())
    pairs = max(timing.pairs, 1)
    out = {f"{name}_us_per_pair": (after[name] - before[name]) * 1e6 / pairs for name in before}
    # Issue 21's figure: the serving path's CPU around the model (API + feeders + Redis).
    out["path_us_per_pair"] = sum(out[f"{k}_us_per_pair"] for k in ("api", "worker", "redis"))
    if "engine" in before and service.env["DEVICE"] != "cpu":
        forward = counters_after["forward_cpu"] - counters["forward_cpu"]
        out["engine_outside_forward_us_per_pair"] = ((after["engine"] - before["engine"]) - forward) * 1e6 / pairs
    return timing, out

