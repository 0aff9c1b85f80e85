"""Side-by-side benchmark: the model in-process (ceiling), a server that scores as FastGPT's
original bge-rerank server does, one request at a time (naive), and this service end to end
(gunicorn API, Redis, Celery worker, engine process), on the same machine, model folders and
inputs, measured in turns. Prints one table of figures and ratios and writes it as JSON under
bench/results/.

    python -m bench.run                         # CPU: everything (about 30 minutes on 2 cores)
    python -m bench.run --only w2,w3 --quick    # a smaller, faster pass
    python -m bench.run --device sim            # the GPU path on a simulated H100 (engine/backends/sim.py)
    python -m bench.run --device cuda           # on a GPU machine

CPU: random-weight XLM-R models built once under bench/.cache, the exact bge-reranker-base
architecture for W1 and a small one (4 layers, hidden 256) for W2-W4.
GPU and sim: the bge-reranker-base architecture throughout, FastGPT-like lengths (documents of
150-650 tokens), 64 clients in W2, a bulk job of 200 000 pairs in W4, the cold-start burst W5,
the ceiling is the model alone on pre-tokenized pairs (best backend), and a fourth column,
"before", is the service laid out as it was before the engine process and CUDA graphs
(ENGINE_PROCESS=false CUDA_GRAPHS=off): the loss the H100 showed, and what was won back. With
`--device sim` every figure is of the simulated device, and the table says so.
The CPU time each process spent per pair (API, worker, engine, Redis) is reported for W2 and W4,
so the host cores a GPU needs can be computed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests

from rerank.launch import free_port
from rerank.random_model import build_model, documents_of_length
from tests.procs import Proc, base_env, start_api, start_redis, start_worker, wait_for

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"

TARGETS_CPU = {
    "w1_service_over_ceiling": ("<=", 1.15),
    "w2_service_over_naive": (">=", 3.0),
    "w2_service_over_ceiling": (">=", 0.85),
    "w3_added_ms_p50": ("<=", 5.0),
    "w4_service_over_ceiling": (">=", 0.95),
}
#: Issue 11's targets on a GPU (and on the simulated one, as far as 2 cores allow).
TARGETS_GPU = {
    "w2_service_over_naive": (">=", 3.0),
    "w2_service_over_ceiling": (">=", 0.9),
    "w3_added_ms_p50": ("<=", 3.0),
    "w3_service_over_naive": ("<=", 0.6),
    "w4_service_over_ceiling": (">=", 0.95),
    "w5_429": ("<=", 0),
    "engine_cpu_us_per_pair_outside_forward": ("<=", 20.0),
}
#: Issue 21's (one engine per GPU, many feeders), on a GPU and on the simulated one.
TARGETS_FEEDERS = {
    "w2_path_cpu_us_per_pair": ("<=", 250.0),
    "w2_service_over_ceiling": (">=", 0.9),
    "w3_added_ms_p50": ("<=", 2.0),
    "w3_service_over_naive": ("<=", 0.5),
    "w2_n2_over_n1": (">=", 1.0),
    "w3_n2_minus_n1_ms": ("<=", 0.5),
}


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Workloads:
    w1: list[tuple[str, list[str]]]
    w2: list[list[tuple[str, list[str]]]]  # per client, its requests
    w3: list[tuple[str, list[str]]]
    w4: list[tuple[str, list[str]]]


def make_workloads(tokenizer, *, seed: int, w1_docs: int, w2_clients: int, w2_requests: int,
                   w3_requests: int, w4_pairs: int, doc_tokens: tuple[int, int]) -> Workloads:
    """Query and document lengths from a fixed seed: queries 8-32 tokens, documents `doc_tokens`."""
    rng = random.Random(seed)
    pool = {}

    def text(n: int) -> str:  # a few texts per length, reused: building them is the slow part
        key = (n, rng.randrange(3))
        if key not in pool:
            pool[key] = documents_of_length(tokenizer, [n], seed=rng.randrange(10**9))[0]
        return pool[key]

    def request(n_docs: int) -> tuple[str, list[str]]:
        query = text(rng.randint(8, 32))
        return query, [text(rng.randint(*doc_tokens)) for _ in range(n_docs)]

    return Workloads(
        w1=[request(w1_docs)],
        w2=[[request(20) for _ in range(w2_requests)] for _ in range(w2_clients)],
        w3=[request(1) for _ in range(w3_requests)],
        w4=[request(20) for _ in range(max(1, w4_pairs // 20))],
    )


def model_dir(arch: str, weights: bool = True) -> Path:
    path = CACHE / (arch if weights else f"{arch}-config-only")
    if not (path / "config.json").exists():
        print(f"building a random {arch} model in {path}", flush=True)
        build_model(path, arch, weights=weights)
    return path


# --- measuring ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@dataclass
class Timing:
    latencies: list[float] = field(default_factory=list)
    pairs: int = 0
    wall: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    upload: float = 0.0  # of a bulk job: seconds until its 202

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.latencies:
            out = {"p50_ms": pct(self.latencies, 0.5) * 1000, "p95_ms": pct(self.latencies, 0.95) * 1000}
        if self.wall:
            out["pairs_per_s"] = self.pairs / self.wall
        if self.statuses:
            out["errors"] = sum(n for s, n in self.statuses.items() if s != 200)
        return out


def run_clients(call: Callable[[str, list[str]], int], per_client: list[list[tuple[str, list[str]]]]) -> Timing:
    """Each client sends its requests one after another; clients run concurrently."""
    timing = Timing()
    lock = threading.Lock()

    def client(requests_: list[tuple[str, list[str]]]) -> None:
        for query, docs in requests_:
            started = time.perf_counter()
            status = call(query, docs)
            took = time.perf_counter() - started
            with lock:
                timing.latencies.append(took)
                timing.pairs += len(docs)
                timing.statuses[status] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(len(per_client)) as pool:
        list(pool.map(client, per_client))
    timing.wall = time.perf_counter() - started
    return timing


def http_caller(url: str, strict: bool = True) -> Callable[[str, list[str]], int]:
    local = threading.local()

    def call(query: str, docs: list[str]) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        r = session.post(url + "/v1/rerank", json={"query": query, "documents": docs}, timeout=900)
        if strict and r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
        return r.status_code

    return call


class CPU:
    """CPU seconds (user + system) of groups of processes, from /proc (Linux)."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    @classmethod
    def seconds(cls, pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / cls.TICK
        except (OSError, IndexError, ValueError):
            return 0.0

    @staticmethod
    def children(pid: int) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass
        return out

    def snapshot(self) -> dict[str, float]:
        return {name: sum(self.seconds(p) for p in pids) for name, pids in self.groups.items()}


# --- the systems, loaded side by side and measured in turns ---------------------------------------
# All stay loaded while the others run (idle processes cost nothing measurable), and every
# measurement alternates between them, so the slow drift of this VM's speed (~10 %) falls on all
# of them alike instead of on whichever happened to run last.


class Ceiling:
    """The model in-process: the engine without HTTP, queue or processes. On a GPU (or the
    simulated one) pairs are tokenized before the clock starts: the model alone."""

    name = "ceiling"

    def __init__(self, path: Path, device: str, pretokenized: bool) -> None:
        from engine import Engine, EngineConfig

        self.engine = Engine.start(EngineConfig(source=str(path), device=device))
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
        env = base_env(MODEL_DIR=str(path), DEVICE=device)
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
                 extra: dict[str, str] | None = None, warm: bool = True, feeders: int | None = None) -> None:
        self.name = name
        self.redis = self.worker = self.api = self.engine = None
        self.feeders: list[Proc] = []
        try:
            self.redis, redis_url = start_redis(log_dir)
            env = base_env(**{"REDIS_URL": redis_url, "MODELS": f"bench={path}", "SYNC_TIMEOUT": "900",
                              "DEVICE": device, "DATA_DIR": str(log_dir / f"data-{name}-{path.name}"),
                              "LOG_LEVEL": "WARNING", "API_WORKERS": "2", "HEARTBEAT_INTERVAL": "0.5",
                              **(extra or {})})
            self.env = env
            self.started = time.perf_counter()
            if feeders:
                self._sockets = tempfile.mkdtemp(prefix="rb-")
                socket_path = os.path.join(self._sockets, "e.sock")
                self.engine = Proc(f"{name}-engine-{path.name}", [sys.executable, "-m", "engine", "--model", "bench",
                                                                  "--socket", socket_path], env, log_dir)
                feeder_env = dict(env, ENGINE_SOCKET=socket_path)
                self.feeders = [start_worker(f"{name}-feeder{n}-{path.name}", feeder_env, log_dir, "bench",
                                             wait=False) for n in range(feeders)]
                import redis as redis_lib

                from shared.workers import WorkerRegistry

                registry = WorkerRegistry(redis_lib.Redis.from_url(redis_url))
                wait_for(lambda: len(registry.alive("bench", fresh=True)) == feeders, 300,
                         f"{feeders} feeders of one engine", self.engine)
                self.worker = self.feeders[0]
            else:
                self.worker = start_worker(f"{name}-worker-{path.name}", env, log_dir, "bench")
            self.api, self.url = start_api(f"{name}-api-{path.name}", env, log_dir)
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


def measure(path: Path, w: Workloads, only: set[str], log_dir: Path, args) -> dict[str, dict]:
    """Every requested workload on every system, in turns."""
    gpu = args.device != "cpu"
    out: dict[str, dict] = {"ceiling": {}, "naive": {}, "before": {}, "service": {}}
    naive = Naive(path, log_dir, args.device) if only & {"w1", "w2", "w3"} else None
    counts = [int(n) for n in str(args.feeders).split(",")]
    service = Service(path, log_dir, args.device, feeders=counts[0] or None)
    more = [Service(path, log_dir, args.device, name=f"service_n{n}", feeders=n) for n in counts[1:]]
    for extra in more:
        out[extra.name] = {}
    before = (Service(path, log_dir, args.device, name="before", extra={"ENGINE_PROCESS": "false",
                                                                           "CUDA_GRAPHS": "off"})
              if gpu and args.before else None)
    ceiling = Ceiling(path, args.device, pretokenized=gpu)
    ceiling.call("warm", ["up"])
    services = [s for s in (service, before, *more) if s is not None]
    systems = [s for s in (ceiling, naive, *services) if s is not None]
    for system in services:  # the weights are loaded once per engine, whatever the feeders
        info = system.worker_info()
        out[system.name]["engine"] = {"feeders": len(system.feeders) or 1, "memory_mib": info.get("engine_memory_mib"),
                                      "shared": info.get("engine_shared"), "pid": info.get("engine_pid")}
    try:
        if "w1" in only:
            print("  W1 …", flush=True)
            runs = {s.name: Timing() for s in systems}
            for _ in range(args.w1_reps):
                for system in systems:
                    timing = ceiling.clients([w.w1]) if system is ceiling else run_clients(system.call, [w.w1])
                    runs[system.name].latencies += timing.latencies
            for name, timing in runs.items():
                out[name]["w1"] = timing.summary()
        if "w2" in only:
            print(f"  W2 ({len(w.w2)} clients) …", flush=True)
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for system in systems:
                    if system is ceiling:
                        summary = ceiling.whole([r for c in w.w2 for r in c]).summary()
                    elif isinstance(system, Service):
                        timing, cpu = cpu_per_pair(system, lambda s=system: run_clients(s.call, w.w2))
                        summary = {**timing.summary(), "cpu": cpu}
                    else:
                        summary = run_clients(system.call, w.w2).summary()
                    if summary["pairs_per_s"] > best.get(system.name, {}).get("pairs_per_s", 0):
                        best[system.name] = summary
            for name, summary in best.items():
                out[name]["w2"] = summary
            if not gpu:
                out["ceiling"]["w2_seed_scoring_in_process"] = seed_profile(ceiling, w)
        if "w3" in only:
            print("  W3 …", flush=True)
            best = {}
            for _ in range(args.repeat):
                for system in systems:
                    timing = ceiling.clients([w.w3]) if system is ceiling else run_clients(system.call, [w.w3])
                    summary = timing.summary()
                    if summary["p50_ms"] < best.get(system.name, {}).get("p50_ms", float("inf")):
                        best[system.name] = summary
            for name, summary in best.items():
                out[name]["w3"] = summary
        if "w4" in only:
            print(f"  W4 ({sum(len(d) for _, d in w.w4)} pairs) …", flush=True)
            totals = {s.name: Timing() for s in (ceiling, *services)}
            uploads = {s.name: 0.0 for s in services}
            cpu: dict[str, dict[str, float]] = {s.name: {} for s in services}
            model = {s.name: dict.fromkeys(("model_s", "pairs", "real_tokens", "padded_tokens"), 0.0)
                     for s in services}
            # CPU: four jobs, each between two ceiling turns (the VM drifts). GPU/sim: one job of all
            # the pairs, as the target asks, with the ceiling timed before and after it.
            part = len(w.w4) if gpu else max(1, len(w.w4) // 4)
            chunks = [w.w4[start : start + part] for start in range(0, len(w.w4), part)]
            for chunk in chunks:
                for _ in range(2 if gpu else 1):
                    timing = ceiling.whole(chunk)
                    totals["ceiling"].pairs += timing.pairs
                    totals["ceiling"].wall += timing.wall
                for system in services:
                    counters = system.model_counters()
                    timing, figures = cpu_per_pair(system, lambda s=system: s.bulk_job(chunk))
                    totals[system.name].pairs += timing.pairs
                    totals[system.name].wall += timing.wall
                    uploads[system.name] += timing.upload
                    for key, value in figures.items():
                        cpu[system.name][key] = cpu[system.name].get(key, 0.0) + value * timing.pairs
                    after = system.model_counters(after=time.time())
                    for key in model[system.name]:
                        model[system.name][key] += after[key] - counters[key]
            for name, timing in totals.items():
                out[name]["w4"] = {"pairs_per_s": timing.pairs / timing.wall, "pairs": timing.pairs,
                                   "seconds": timing.wall}
            for system in services:
                m, t = model[system.name], totals[system.name]
                out[system.name]["w4"]["cpu"] = {k: v / t.pairs for k, v in cpu[system.name].items()}
                out[system.name]["w4"]["upload_seconds"] = uploads[system.name]
                out[system.name]["w4"]["pairs_per_s_after_accept"] = t.pairs / (t.wall - uploads[system.name])
                # Where the W4 time went: model busy share of the wall, the model's own pace while
                # busy, and padding (the ceiling sorts the whole workload at once).
                out[system.name]["w4_profile"] = {
                    "model_busy_share": m["model_s"] / t.wall,
                    "pairs_per_model_second": m["pairs"] / m["model_s"] if m["model_s"] else 0.0,
                    "real_over_padded_tokens": m["real_tokens"] / m["padded_tokens"] if m["padded_tokens"] else 0.0,
                }
    finally:
        for system in systems:
            if system is not ceiling:
                system.close()
        ceiling.close()
        gc.collect()
    if "w5" in only and gpu:
        print("  W5 (cold start burst) …", flush=True)
        out["service"]["w5"] = cold_start_burst(path, w, log_dir, args)
    return out


def cold_start_burst(path: Path, w: Workloads, log_dir: Path, args) -> dict[str, float]:
    """A fresh stack; the moment it answers ready, 64 clients send FastGPT-like calls (closed loop)."""
    service = Service(path, log_dir, args.device, name="cold", warm=False)
    try:
        call = http_caller(service.url, strict=False)
        timing = run_clients(call, w.w2)
        return {**timing.summary(), "ready_after_s": service.ready_after, "calls": sum(timing.statuses.values()),
                "statuses": {str(k): v for k, v in timing.statuses.items()}, "429": timing.statuses.get(429, 0)}
    finally:
        service.close()


def seed_profile(ceiling: Ceiling, w: Workloads) -> dict[str, float]:
    """Why the naive server is slow on a CPU: its scoring alone, in-process, and its padding."""
    from bench.naive_server import SEED_BATCH, naive_scores

    encoder, backend = ceiling.engine.encoder, ceiling.engine.scorer.batcher.backend
    requests_ = [r for c in w.w2 for r in c]
    real = padded = 0
    for query, docs in requests_:
        lengths = encoder.encode(query, docs).lengths.tolist()
        real += sum(lengths)
        for start in range(0, len(lengths), SEED_BATCH):
            chunk = lengths[start : start + SEED_BATCH]
            padded += len(chunk) * max(chunk)
    started = time.perf_counter()
    for query, docs in requests_:
        naive_scores(encoder, backend, query, docs)
    took = time.perf_counter() - started
    return {"pairs_per_s": sum(len(d) for _, d in requests_) / took, "real_over_padded_tokens": real / padded}


# --- report -------------------------------------------------------------------------------------


def ratios(r: dict) -> dict[str, float]:
    out = {}
    c, n, s = r.get("ceiling", {}), r.get("naive", {}), r.get("service", {})
    if "w1" in s and "w1" in c:
        out["w1_service_over_ceiling"] = s["w1"]["p50_ms"] / c["w1"]["p50_ms"]
    if "w2" in s:
        if "w2" in n:
            out["w2_service_over_naive"] = s["w2"]["pairs_per_s"] / n["w2"]["pairs_per_s"]
        if "w2" in c:
            out["w2_service_over_ceiling"] = s["w2"]["pairs_per_s"] / c["w2"]["pairs_per_s"]
        if "w2" in r.get("before", {}) and "w2" in c:
            out["w2_before_over_ceiling"] = r["before"]["w2"]["pairs_per_s"] / c["w2"]["pairs_per_s"]
    if "w3" in s and "w3" in c:
        out["w3_added_ms_p50"] = s["w3"]["p50_ms"] - c["w3"]["p50_ms"]
        if "w3" in n:
            out["w3_service_over_naive"] = s["w3"]["p50_ms"] / n["w3"]["p50_ms"]
    if "w4" in s and "w4" in c:
        out["w4_service_over_ceiling"] = s["w4"]["pairs_per_s"] / c["w4"]["pairs_per_s"]
        if "w4" in r.get("before", {}):
            out["w4_before_over_ceiling"] = r["before"]["w4"]["pairs_per_s"] / c["w4"]["pairs_per_s"]
    if "w5" in s:
        out["w5_429"] = s["w5"]["429"]
    cpu = s.get("w2", {}).get("cpu", {})
    if "path_us_per_pair" in cpu:
        out["w2_path_cpu_us_per_pair"] = cpu["path_us_per_pair"]
    n2 = r.get("service_n2", {})
    if "w2" in n2 and "w2" in s:
        out["w2_n2_over_n1"] = n2["w2"]["pairs_per_s"] / s["w2"]["pairs_per_s"]
    if "w3" in n2 and "w3" in s:
        out["w3_n2_minus_n1_ms"] = n2["w3"]["p50_ms"] - s["w3"]["p50_ms"]
    if "engine_outside_forward_us_per_pair" in cpu:
        out["engine_cpu_us_per_pair_outside_forward"] = cpu["engine_outside_forward_us_per_pair"]
    return out


def table(report: dict) -> str:
    r = report["results"]
    gpu = report["device"] != "cpu"
    targets = {**TARGETS_GPU, **TARGETS_FEEDERS} if gpu else TARGETS_CPU
    systems = ["ceiling", "naive", "before", "service"] if gpu else ["ceiling", "naive", "service"]
    systems += sorted(name for name in r if name.startswith("service_n"))
    rows = [("workload", "metric", *systems, "ratio", "target", "met")]

    def fig(system: str, wl: str, key: str) -> str:
        if not key:  # a ratio-only row
            return ""
        value = r.get(system, {}).get(wl, {}).get(key)
        if value is None:
            return "–"
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"

    def add(wl, metric, key, ratio_key=None):
        ratio = report["ratios"].get(ratio_key) if ratio_key else None
        op, target = targets.get(ratio_key, ("", None)) if ratio_key else ("", None)
        met = "" if ratio is None or target is None else ("yes" if (ratio <= target if op == "<=" else ratio >= target) else "NO")
        rows.append((wl, metric, *(fig(s, wl, key) for s in systems),
                     "" if ratio is None else f"{ratio:.2f}", "" if target is None else f"{op} {target:g}", met))

    add("w1", "latency p50 ms", "p50_ms", "w1_service_over_ceiling")
    add("w1", "latency p95 ms", "p95_ms")
    add("w2", "pairs/s", "pairs_per_s", "w2_service_over_naive")
    add("w2", "  (service / ceiling)", "", "w2_service_over_ceiling")
    if gpu:
        add("w2", "  (before / ceiling)", "", "w2_before_over_ceiling")
        add("w2", "errors", "errors")
    add("w2", "latency p95 ms", "p95_ms")
    add("w3", "latency p50 ms", "p50_ms", "w3_added_ms_p50")
    if gpu:
        add("w3", "  (service / naive)", "", "w3_service_over_naive")
    add("w4", "pairs/s", "pairs_per_s", "w4_service_over_ceiling")
    if gpu:
        add("w4", "  (before / ceiling)", "", "w4_before_over_ceiling")
        add("w5", "429 answers, cold burst", "429", "w5_429")
        add("cpu", "engine µs/pair outside fwd", "", "engine_cpu_us_per_pair_outside_forward")
    add("cpu", "W2 API+feeders+Redis µs/pair", "", "w2_path_cpu_us_per_pair")
    add("w2", "  (N=2 feeders / N=1)", "", "w2_n2_over_n1")
    add("w3", "  (N=2 feeders − N=1, ms)", "", "w3_n2_minus_n1_ms")
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(v).ljust(wd) for v, wd in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * wd for wd in widths))
    if report["device"] == "sim":
        lines.insert(0, "SIMULATED H100 (DEVICE=sim, engine/backends/sim.py): device times are replayed from "
                        "measured H100 timings; every other cost is real on this machine.")
    seed = r.get("ceiling", {}).get("w2_seed_scoring_in_process")
    ceil = r.get("ceiling", {}).get("w2", {}).get("pairs_per_s")
    if seed and ceil:
        lines.append(
            f"\nW2 profile: the naive server's scoring alone, in-process, does {seed['pairs_per_s']:.1f} pairs/s "
            f"({100 * seed['real_over_padded_tokens']:.0f} % of its computed tokens are real); the ceiling, "
            f"length-sorted under a token budget, does {ceil:.1f}: x{ceil / seed['pairs_per_s']:.2f} is all "
            "that scoring order can gain on this device.")
    ceil4 = r.get("ceiling", {}).get("w4", {}).get("pairs_per_s")
    for name in ("before", "service"):
        prof = r.get(name, {}).get("w4_profile")
        w4 = r.get(name, {}).get("w4", {})
        if prof and ceil4:
            if w4.get("upload_seconds"):
                lines.append(
                    f"W4 ({name}): {w4['seconds']:.1f} s in all, of which {w4['upload_seconds']:.1f} s uploading the "
                    f"input until its 202; after the 202, {w4['pairs_per_s_after_accept']:.0f} pairs/s "
                    f"({w4['pairs_per_s_after_accept'] / ceil4:.2f} x the ceiling).")
            lines.append(
                f"W4 profile ({name}): the model ran {100 * prof['model_busy_share']:.0f} % of the job's wall time, "
                f"at {prof['pairs_per_model_second']:.1f} pairs per model-second "
                f"({prof['pairs_per_model_second'] / ceil4:.2f} x the ceiling's {ceil4:.1f}); "
                f"{100 * prof['real_over_padded_tokens']:.0f} % of its computed tokens were real.")
    for wl in ("w2", "w4"):
        for name in ("before", "service", *sorted(n for n in r if n.startswith("service_n"))):
            cpu = r.get(name, {}).get(wl, {}).get("cpu")
            if cpu:
                parts = ", ".join(f"{k.removesuffix('_us_per_pair').replace('_', ' ')} {v:.0f}" for k, v in cpu.items())
                lines.append(f"CPU µs per pair, {wl.upper()} ({name}): {parts}")
    for name in ("service", *sorted(n for n in r if n.startswith("service_n"))):
        eng = r.get(name, {}).get("engine")
        if eng:
            lines.append(f"Engine ({name}): one process, {eng['feeders']} feeder(s), "
                         f"{eng['memory_mib'] or 0:.0f} MiB resident when ready")
    w5 = r.get("service", {}).get("w5")
    if w5:
        lines.append(f"W5: ready {w5['ready_after_s']:.1f} s after start; {w5['calls']} calls right after: {w5['statuses']}")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="workloads to run, comma-separated (default w1-w4; w5 too on GPU/sim)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or sim (a simulated H100)")
    parser.add_argument("--before", action=argparse.BooleanOptionalAction, default=True,
                        help="GPU/sim: also run the pre-engine layout (ENGINE_PROCESS=false CUDA_GRAPHS=off)")
    parser.add_argument("--feeders", default="1",
                        help="workers feeding the service's one engine; a list (1,2) adds a column per further "
                             "count (service_n2 …); 0: one worker with an engine of its own")
    parser.add_argument("--w1-reps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="W2 and W3 turns per system; the best counts")
    parser.add_argument("--w2-clients", type=int)
    parser.add_argument("--w2-requests", type=int, default=4, help="requests per W2 client")
    parser.add_argument("--w3-requests", type=int, default=100)
    parser.add_argument("--w4-pairs", type=int)
    parser.add_argument("--w1-arch", default="base")
    parser.add_argument("--arch", help="model of W2-W4 (default: small on CPU, base on GPU/sim)")
    parser.add_argument("--out", help="JSON file (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    gpu = args.device != "cpu"
    args.arch = args.arch or ("base" if gpu else "small")
    args.w2_clients = args.w2_clients or (64 if gpu else 16)
    args.w4_pairs = args.w4_pairs or (200_000 if gpu else 20_000)
    if args.quick:
        args.w1_reps, args.w2_requests, args.w3_requests, args.repeat = 2, 1, 20, 1
        args.w4_pairs = min(args.w4_pairs, 4000 if gpu else 1000)
    only = set((args.only or ("w1,w2,w3,w4,w5" if gpu else "w1,w2,w3,w4")).split(","))

    weights = args.device != "sim"  # the simulated device never loads weights
    small = model_dir(args.arch, weights)
    from transformers import AutoTokenizer

    w = make_workloads(AutoTokenizer.from_pretrained(str(small)), seed=1234, w1_docs=100, w2_clients=args.w2_clients,
                       w2_requests=args.w2_requests, w3_requests=args.w3_requests, w4_pairs=args.w4_pairs,
                       doc_tokens=(150, 650) if gpu else (30, 400))
    log_dir = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    print(f"logs in {log_dir} (removed after a run that ends well)", flush=True)
    results: dict[str, dict] = {"ceiling": {}, "naive": {}, "before": {}, "service": {}}
    try:
        if "w1" in only:
            print(f"W1 on {args.w1_arch} …", flush=True)
            for name, figures in measure(model_dir(args.w1_arch, weights), w, {"w1"}, log_dir, args).items():
                results.setdefault(name, {}).update(figures)
        rest = only & {"w2", "w3", "w4", "w5"}
        if rest:
            print(f"{', '.join(sorted(rest)).upper()} on {args.arch} …", flush=True)
            for name, figures in measure(small, w, rest, log_dir, args).items():
                results.setdefault(name, {}).update(figures)
    except BaseException:
        print(f"the run failed: its logs are kept in {log_dir}", flush=True)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)

    report = {"machine": machine(), "device": args.device, "simulated": args.device == "sim",
              "models": {"w1": args.w1_arch, "w2_w4": args.arch},
              "workloads": {"repeat_best_of": args.repeat, "w1_docs": 100, "w1_reps": args.w1_reps,
                            "w2_clients": args.w2_clients, "w2_requests_per_client": args.w2_requests,
                            "w3_requests": args.w3_requests, "w4_pairs": sum(len(d) for _, d in w.w4),
                            "doc_tokens": [150, 650] if gpu else [30, 400]},
              "results": results}
    report["ratios"] = ratios(results)
    text = table(report)
    print("\n" + text)
    kind = "sim" if args.device == "sim" else "gpu" if report["machine"]["cuda"] and gpu else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"{kind}-{report['machine']['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["table"] = text
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
