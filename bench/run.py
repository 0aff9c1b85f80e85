"""Side-by-side benchmark: the scoring function in-process (ceiling), the seed's one-request-at-a-
time server (naive) and this service end to end (gunicorn API, Redis, Celery worker), on the same
machine, model folders and inputs. Prints one table of figures and ratios and writes it as JSON.

    python -m bench.run                       # everything (about 20 minutes on 2 CPU cores)
    python -m bench.run --only w2,w3 --quick  # a smaller, faster pass

Models are random-weight XLM-R rerankers built once under bench/.cache: the exact
bge-reranker-base architecture for W1, a small one (4 layers, hidden 256) for W2-W4.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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

TARGETS = {
    "w1_service_over_ceiling": ("<=", 1.15),
    "w2_service_over_naive": (">=", 3.0),
    "w2_service_over_ceiling": (">=", 0.85),
    "w3_added_ms_p50": ("<=", 5.0),
    "w4_service_over_ceiling": (">=", 0.95),
}


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Workloads:
    w1: list[tuple[str, list[str]]]
    w2: list[list[tuple[str, list[str]]]]  # per client, its requests
    w3: list[tuple[str, list[str]]]
    w4: list[tuple[str, list[str]]]


def make_workloads(tokenizer, *, seed: int, w1_docs: int, w2_clients: int, w2_requests: int,
                   w3_requests: int, w4_pairs: int) -> Workloads:
    """Query and document lengths from a fixed seed: documents 30-400 tokens, queries 8-32."""
    rng = random.Random(seed)

    def request(n_docs: int) -> tuple[str, list[str]]:
        query = documents_of_length(tokenizer, [rng.randint(8, 32)], seed=rng.randrange(10**9))[0]
        docs = documents_of_length(tokenizer, [rng.randint(30, 400) for _ in range(n_docs)],
                                   seed=rng.randrange(10**9))
        return query, docs

    return Workloads(
        w1=[request(w1_docs)],
        w2=[[request(20) for _ in range(w2_requests)] for _ in range(w2_clients)],
        w3=[request(1) for _ in range(w3_requests)],
        w4=[request(20) for _ in range(max(1, w4_pairs // 20))],
    )


def model_dir(arch: str) -> Path:
    path = CACHE / arch
    if not (path / "config.json").exists():
        print(f"building a random {arch} model in {path}", flush=True)
        build_model(path, arch)
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

    def summary(self) -> dict[str, float]:
        out = {}
        if self.latencies:
            out = {"p50_ms": pct(self.latencies, 0.5) * 1000, "p95_ms": pct(self.latencies, 0.95) * 1000}
        if self.wall:
            out["pairs_per_s"] = self.pairs / self.wall
        return out


def run_clients(call: Callable[[str, list[str]], None], per_client: list[list[tuple[str, list[str]]]]) -> Timing:
    """Each client sends its requests one after another; clients run concurrently."""
    timing = Timing()
    lock = threading.Lock()

    def client(requests_: list[tuple[str, list[str]]]) -> None:
        for query, docs in requests_:
            started = time.perf_counter()
            call(query, docs)
            took = time.perf_counter() - started
            with lock:
                timing.latencies.append(took)
                timing.pairs += len(docs)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(per_client)) as pool:
        list(pool.map(client, per_client))
    timing.wall = time.perf_counter() - started
    return timing


def http_caller(url: str) -> Callable[[str, list[str]], None]:
    local = threading.local()

    def call(query: str, docs: list[str]) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        r = session.post(url + "/v1/rerank", json={"query": query, "documents": docs}, timeout=900)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

    return call


# --- the three systems, loaded side by side and measured in turns -------------------------------
# All three stay loaded while the others run (idle processes cost nothing measurable), and every
# measurement alternates between them, so the slow drift of this VM's speed (~10 %) falls on all
# three alike instead of on whichever happened to run last.


class Ceiling:
    """The scoring function called in-process: no HTTP, no queue."""

    name = "ceiling"

    def __init__(self, path: Path, device: str) -> None:
        from worker.model import load_reranker
        from worker.scoring import ScoringSettings, default_batch_tokens, score_pairs

        self.reranker = load_reranker(str(path), device=device)
        self.settings = ScoringSettings(max_batch_tokens=default_batch_tokens(self.reranker.device.type))
        self._score = score_pairs

    def call(self, query: str, docs: list[str]) -> None:
        self._score(self.reranker, [(query, d) for d in docs], self.settings)

    def whole(self, requests_: list[tuple[str, list[str]]]) -> Timing:
        """The whole workload as one call (the batcher's best case: global sort)."""
        pairs = [(q, d) for q, docs in requests_ for d in docs]
        started = time.perf_counter()
        self._score(self.reranker, pairs, self.settings)
        took = time.perf_counter() - started
        return Timing([], len(pairs), took)


class Naive:
    """The seed's way: one request at a time over HTTP, unsorted batches of 256."""

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
    """This project end to end: gunicorn API, Redis, a Celery worker."""

    name = "service"

    def __init__(self, path: Path, log_dir: Path, device: str) -> None:
        self.redis, redis_url = start_redis(log_dir)
        env = base_env(REDIS_URL=redis_url, MODELS=f"bench={path}", SYNC_TIMEOUT="900", DEVICE=device,
                       DATA_DIR=str(log_dir / f"data-{path.name}"), LOG_LEVEL="WARNING",
                       API_WORKERS="2", API_THREADS="32", HEARTBEAT_INTERVAL="0.5")
        self.worker = start_worker(f"worker-{path.name}", env, log_dir, "bench")
        self.api, self.url = start_api(f"api-{path.name}", env, log_dir)
        self.call = http_caller(self.url)
        self.call("warm", ["up"])

    def bulk_job(self, items: list[tuple[str, list[str]]]) -> Timing:
        """Through the job path: submit, poll until done; from submission to the end."""
        body = {"items": [{"query": q, "documents": d} for q, d in items]}
        pairs = sum(len(d) for _, d in items)
        started = time.perf_counter()
        r = requests.post(self.url + "/v1/rerank/jobs", json=body, timeout=600)
        r.raise_for_status()
        job = r.json()["id"]
        while True:
            status = requests.get(f"{self.url}/v1/rerank/jobs/{job}", timeout=30).json()
            if status["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        if status["status"] != "succeeded":
            raise RuntimeError(f"bulk job ended {status['status']}: {status}")
        return Timing([], pairs, time.perf_counter() - started)

    def model_counters(self, after: float = 0.0) -> dict[str, float]:
        """The worker's model seconds, pairs and tokens so far, from /metrics (published with each
        heartbeat, so wait for one that started after `after`)."""
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {"rerank_batch_seconds_sum": "model_s", "rerank_pairs_scored_total": "pairs",
                  "rerank_tokens_scored_total": "real_tokens", "rerank_tokens_computed_total": "padded_tokens"}
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
        self.api.stop()
        self.worker.stop()
        self.redis.stop()


def measure(path: Path, w: Workloads, only: set[str], log_dir: Path, args) -> dict[str, dict]:
    """Every requested workload on all three systems, in turns."""
    out: dict[str, dict] = {"ceiling": {}, "naive": {}, "service": {}}
    naive = Naive(path, log_dir, args.device) if only & {"w1", "w2", "w3"} else None
    service = Service(path, log_dir, args.device)
    ceiling = Ceiling(path, args.device)
    ceiling.call("warm", ["up"])
    systems = [s for s in (ceiling, naive, service) if s is not None]
    try:
        if "w1" in only:
            print("  W1 …", flush=True)
            runs = {s.name: Timing() for s in systems}
            for _ in range(args.w1_reps):
                for system in systems:
                    runs[system.name].latencies += run_clients(system.call, [w.w1]).latencies
            for name, timing in runs.items():
                out[name]["w1"] = timing.summary()
        if "w2" in only:
            print("  W2 …", flush=True)
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for system in systems:
                    timing = ceiling.whole([r for c in w.w2 for r in c]) if system is ceiling \
                        else run_clients(system.call, w.w2)
                    summary = timing.summary()
                    if summary["pairs_per_s"] > best.get(system.name, {}).get("pairs_per_s", 0):
                        best[system.name] = summary
            for name, summary in best.items():
                out[name]["w2"] = summary
            out["ceiling"]["w2_seed_scoring_in_process"] = seed_profile(ceiling, w)
        if "w3" in only:
            print("  W3 …", flush=True)
            best = {}
            for _ in range(args.repeat):
                for system in systems:
                    summary = run_clients(system.call, [w.w3]).summary()
                    if summary["p50_ms"] < best.get(system.name, {}).get("p50_ms", float("inf")):
                        best[system.name] = summary
            for name, summary in best.items():
                out[name]["w3"] = summary
        if "w4" in only:
            print("  W4 …", flush=True)
            totals = {"ceiling": Timing(), "service": Timing()}
            model = dict.fromkeys(("model_s", "pairs", "real_tokens", "padded_tokens"), 0.0)
            part = max(1, len(w.w4) // 4)
            for start in range(0, len(w.w4), part):
                chunk = w.w4[start : start + part]
                before = service.model_counters()
                for name, timing in (("ceiling", ceiling.whole(chunk)), ("service", service.bulk_job(chunk))):
                    totals[name].pairs += timing.pairs
                    totals[name].wall += timing.wall
                after = service.model_counters(after=time.time())
                for key in model:
                    model[key] += after[key] - before[key]
            for name, timing in totals.items():
                out[name]["w4"] = {"pairs_per_s": timing.pairs / timing.wall, "pairs": timing.pairs,
                                   "seconds": timing.wall}
            # Where the service's W4 time went: model busy share of the wall, the model's own pace
            # while busy, and padding (the ceiling sorts the whole workload at once).
            out["service"]["w4_profile"] = {
                "model_busy_share": model["model_s"] / totals["service"].wall,
                "pairs_per_model_second": model["pairs"] / model["model_s"] if model["model_s"] else 0.0,
                "real_over_padded_tokens": model["real_tokens"] / model["padded_tokens"] if model["padded_tokens"] else 0.0,
            }
    finally:
        service.close()
        if naive is not None:
            naive.close()
        del ceiling
        gc.collect()
    return out


def seed_profile(ceiling: Ceiling, w: Workloads) -> dict[str, float]:
    """Why the naive server is slow: the seed's scoring alone, in-process, and its padding."""
    from bench.naive_server import SEED_BATCH, naive_scores

    requests_ = [r for c in w.w2 for r in c]
    real = padded = 0
    for query, docs in requests_:
        lengths = [len(x) for x in ceiling.reranker.encode(query, docs)]
        real += sum(lengths)
        for start in range(0, len(lengths), SEED_BATCH):
            chunk = lengths[start : start + SEED_BATCH]
            padded += len(chunk) * max(chunk)
    started = time.perf_counter()
    for query, docs in requests_:
        naive_scores(ceiling.reranker, query, docs)
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
    if "w3" in s and "w3" in c:
        out["w3_added_ms_p50"] = s["w3"]["p50_ms"] - c["w3"]["p50_ms"]
    if "w4" in s and "w4" in c:
        out["w4_service_over_ceiling"] = s["w4"]["pairs_per_s"] / c["w4"]["pairs_per_s"]
    return out


def table(report: dict) -> str:
    r = report["results"]
    rows = [("workload", "metric", "ceiling", "naive", "service", "ratio", "target", "met")]

    def fig(system: str, wl: str, key: str) -> str:
        if not key:  # a ratio-only row
            return ""
        value = r.get(system, {}).get(wl, {}).get(key)
        return "–" if value is None else (f"{value:.1f}" if value < 1000 else f"{value:.0f}")

    def add(wl, metric, key, ratio_key=None):
        ratio = report["ratios"].get(ratio_key) if ratio_key else None
        op, target = TARGETS.get(ratio_key, ("", None)) if ratio_key else ("", None)
        met = "" if ratio is None or target is None else ("yes" if (ratio <= target if op == "<=" else ratio >= target) else "NO")
        rows.append((wl, metric, fig("ceiling", wl, key), fig("naive", wl, key), fig("service", wl, key),
                     "" if ratio is None else f"{ratio:.2f}", "" if target is None else f"{op} {target:g}", met))

    add("w1", "latency p50 ms", "p50_ms", "w1_service_over_ceiling")
    add("w1", "latency p95 ms", "p95_ms")
    add("w2", "pairs/s", "pairs_per_s", "w2_service_over_naive")
    add("w2", "  (service / ceiling)", "", "w2_service_over_ceiling")
    add("w2", "latency p95 ms", "p95_ms")
    add("w3", "latency p50 ms", "p50_ms", "w3_added_ms_p50")
    add("w4", "pairs/s", "pairs_per_s", "w4_service_over_ceiling")
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    seed = r.get("ceiling", {}).get("w2_seed_scoring_in_process")
    ceil = r.get("ceiling", {}).get("w2", {}).get("pairs_per_s")
    if seed and ceil:
        lines.append(
            f"\nW2 profile: the seed's scoring alone, in-process, does {seed['pairs_per_s']:.1f} pairs/s "
            f"({100 * seed['real_over_padded_tokens']:.0f} % of its computed tokens are real); the ceiling, "
            f"length-sorted under a token budget, does {ceil:.1f}: x{ceil / seed['pairs_per_s']:.2f} is all "
            "that scoring order can gain on this device.")
    prof = r.get("service", {}).get("w4_profile")
    ceil4 = r.get("ceiling", {}).get("w4", {}).get("pairs_per_s")
    if prof and ceil4:
        lines.append(
            f"W4 profile: the worker's model ran {100 * prof['model_busy_share']:.0f} % of the job's wall time, "
            f"at {prof['pairs_per_model_second']:.1f} pairs per model-second ({prof['pairs_per_model_second'] / ceil4:.2f} "
            f"x the ceiling's {ceil4:.1f}); {100 * prof['real_over_padded_tokens']:.0f} % of its computed tokens were real.")
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
    parser.add_argument("--only", default="w1,w2,w3,w4", help="workloads to run (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--w1-reps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="W2 and W3 turns per system; the best counts")
    parser.add_argument("--w2-requests", type=int, default=4, help="requests per W2 client (16 clients)")
    parser.add_argument("--w3-requests", type=int, default=100)
    parser.add_argument("--w4-pairs", type=int, default=20000)
    parser.add_argument("--w1-arch", default="base")
    parser.add_argument("--arch", default="small", help="model of W2-W4")
    parser.add_argument("--out", help="JSON file (default bench/results/<machine>-<date>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.w1_reps, args.w2_requests, args.w3_requests, args.w4_pairs, args.repeat = 2, 1, 20, 1000, 1
    only = set(args.only.split(","))

    small = model_dir(args.arch)
    from transformers import AutoTokenizer

    w = make_workloads(AutoTokenizer.from_pretrained(str(small)), seed=1234, w1_docs=100, w2_clients=16,
                       w2_requests=args.w2_requests, w3_requests=args.w3_requests, w4_pairs=args.w4_pairs)
    log_dir = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    print(f"logs in {log_dir}", flush=True)
    results: dict[str, dict] = {"ceiling": {}, "naive": {}, "service": {}}
    if "w1" in only:
        print(f"W1 on {args.w1_arch} …", flush=True)
        for name, figures in measure(model_dir(args.w1_arch), w, {"w1"}, log_dir, args).items():
            results[name].update(figures)
    rest = only & {"w2", "w3", "w4"}
    if rest:
        print(f"{', '.join(sorted(rest)).upper()} on {args.arch} …", flush=True)
        for name, figures in measure(small, w, rest, log_dir, args).items():
            results[name].update(figures)

    report = {"machine": machine(), "models": {"w1": args.w1_arch, "w2_w4": args.arch},
              "workloads": {"repeat_best_of": args.repeat, "w1_docs": 100, "w1_reps": args.w1_reps, "w2_clients": 16, "w2_requests_per_client": args.w2_requests,
                            "w3_requests": args.w3_requests, "w4_pairs": sum(len(d) for _, d in w.w4)},
              "results": results}
    report["ratios"] = ratios(results)
    text = table(report)
    print("\n" + text)
    out = Path(args.out) if args.out else RESULTS / f"{'gpu' if report['machine']['cuda'] else 'cpu'}-{report['machine']['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["table"] = text
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
