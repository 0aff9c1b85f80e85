"""What tracing costs: the real stack with tracing off and on, side by side in one run.

Two stacks on one Redis, each a gunicorn API and a worker with its engine process serving the
same tiny random model: one with no OTLP endpoint (tracing off), one exporting every call
(`OTEL_TRACES_SAMPLER=always_on`) to an OTLP/HTTP receiver in a process of its own (rerank/otlp.py). The
same calls go to both in alternating rounds, one at a time (latency) and from 8 threads
(throughput); the ratios are on/off. A tiny model keeps the forward pass short, so the service's
own per-call work, where tracing adds its spans, weighs as much as it can. Also timed: what a span
helper costs while tracing is off (shared/tracing.py gives a shared do-nothing object).

    python -m bench.tracing                     # about 3 minutes on 2 cores
    python -m bench.tracing --before 67ce9ec    # and a third stack: that commit's code, without tracing
    python -m bench.tracing --rounds 2          # quicker, noisier

`--before REF` runs the code of a commit before tracing existed (`git archive`, the same virtual
environment) as a third stack, so "off" is also measured against no tracing code at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import requests

from bench.report import RESULTS
from bench.stack import commit_tree
from rerank.procs import ROOT, base_env, start_api, start_redis, start_worker
from rerank.random_model import build_model, sentence

#: Span helpers a realtime call goes through while tracing is off (API and worker together):
#: request attribute, auth, validate, admission, publish, wait, answer; task attributes,
#: tokenize, recording, reply; and the trace id asked by each log line of the call.
HELPERS_PER_CALL = 15


def calls(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"query": sentence(rng, 8), "documents": [sentence(rng, 30) for _ in range(8)]} for _ in range(n)]


def sequential(url: str, bodies: list[dict]) -> list[float]:
    """Latency of each call, sent one after the other (ms)."""
    with requests.Session() as session:
        return [_timed(session, url, body) for body in bodies]


def _timed(session: requests.Session, url: str, body: dict) -> float:
    started = time.perf_counter()
    r = session.post(url + "/v1/rerank", json=body, timeout=30)
    elapsed = (time.perf_counter() - started) * 1000
    r.raise_for_status()
    return elapsed


def interleaved(stacks: dict[str, str], bodies: list[dict]) -> dict[str, list[float]]:
    """Each call sent to every stack in turn (the order rotating), one at a time: neighbouring
    calls see the same load from the rest of the machine, so the comparison is paired."""
    names = list(stacks)
    out: dict[str, list[float]] = {name: [] for name in names}
    sessions = {name: requests.Session() for name in names}
    for i, body in enumerate(bodies):
        for name in names[i % len(names):] + names[: i % len(names)]:
            out[name].append(_timed(sessions[name], stacks[name], body))
    for session in sessions.values():
        session.close()
    return out


def concurrent(url: str, bodies: list[dict], threads: int = 8) -> float:
    """Calls per second with `threads` clients at once."""
    def one(chunk: list[dict]) -> None:
        with requests.Session() as session:
            for body in chunk:
                session.post(url + "/v1/rerank", json=body, timeout=30).raise_for_status()

    chunks = [bodies[i::threads] for i in range(threads)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, chunks))
    return len(bodies) / (time.perf_counter() - started)


def off_helper_ns(repeat: int = 200_000) -> float:
    """Nanoseconds per `with tracing.span(...)` + attribute call while tracing is off."""
    code = ("import time; from shared import tracing; assert not tracing.setup('bench'); t = time.perf_counter(); "
            f"exec('for _ in range({repeat}):\\n with tracing.span(\"x\", None) as s: s.set_attribute(\"a\", 1)'); "
            f"print((time.perf_counter() - t) / {repeat} * 1e9)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per stack")
    parser.add_argument("--calls", type=int, default=60, help="calls per round and mode")
    parser.add_argument("--before", metavar="REF", help="also run this commit's code (tracing absent)")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/tracing-<date>.json)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    procs = []
    # The receiver runs in a process of its own (decoding spans must not slow this one, the
    # client) and outlives the stacks: what they still hold is sent as they stop.
    receiver = subprocess.Popen([sys.executable, "-m", "rerank.otlp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
    endpoint = receiver.stdout.readline().strip()
    try:
        model = build_model(work / "tiny", "tiny")
        redis_proc, redis_url = start_redis(work)
        procs.append(redis_proc)
        common = dict(REDIS_URL=redis_url, SYNC_TIMEOUT="10", HEARTBEAT_INTERVAL="0.5",
                      WORKER_CONCURRENCY="8", TORCH_THREADS="1", LOG_LEVEL="WARNING", DATA_DIR=str(work / "data"))
        stacks = {}
        for name, extra in (("off", {}), ("on", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                                  "OTEL_TRACES_SAMPLER": "always_on"})):
            env = {k: v for k, v in base_env(**common).items() if not k.startswith("OTEL_")}
            env.update(MODELS=f"{name}={model}", **extra)
            procs.append(start_worker(f"worker-{name}", env, work, name))
            api, url = start_api(f"api-{name}", env, work)
            procs.append(api)
            stacks[name] = url
        if args.before:
            code = commit_tree(args.before, work / "before")
            env = {k: v for k, v in base_env(**common).items() if not k.startswith("OTEL_")}
            env.update(MODELS=f"before={model}")
            procs.append(start_worker("worker-before", env, work, "before", code=code))
            api, url = start_api("api-before", env, work, code=code)
            procs.append(api)
            stacks["before"] = url
        for url in stacks.values():
            sequential(url, calls(20, 99))  # warm: connections, caches, the first batches
        latency = {name: [] for name in stacks}
        rate = {name: [] for name in stacks}
        for turn in range(args.rounds):
            order = list(stacks)[turn % len(stacks):] + list(stacks)[:turn % len(stacks)]
            for name, values in interleaved(stacks, calls(args.calls, turn)).items():
                latency[name] += values
            for burst in range(4):  # short bursts, alternating, so load drifts hit every stack alike
                for name in order[burst % len(order):] + order[: burst % len(order)]:
                    rate[name].append(concurrent(stacks[name], calls(args.calls // 2, 1000 + turn * 10 + burst)))
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
        spans = int(receiver.communicate("", timeout=30)[0].strip() or 0)

    p50 = {name: statistics.median(values) for name, values in latency.items()}
    # Paired: the median over calls of one stack's latency over another's for the same call, sent
    # back to back (less sensitive to the machine's load than the ratio of the two medians).
    paired = {f"{a}_over_{b}": round(statistics.median(x / y for x, y in zip(latency[a], latency[b])), 3)
              for a, b in (("on", "off"), ("off", "before")) if a in latency and b in latency}
    p90 = {name: statistics.quantiles(values, n=10)[-1] for name, values in latency.items()}
    rps = {name: statistics.median(values) for name, values in rate.items()}
    helper = off_helper_ns()
    traced_calls = 20 + args.rounds * (args.calls + 4 * (args.calls // 2))  # warm-up, sequential, bursts
    figures = {
        "latency_p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "latency_p90_ms": {k: round(v, 2) for k, v in p90.items()},
        "throughput_calls_per_s_8_threads": {k: round(v, 1) for k, v in rps.items()},
        "latency_paired_median_ratio": paired,
        "p50_on_over_off": round(p50["on"] / p50["off"], 3),
        "throughput_on_over_off": round(rps["on"] / rps["off"], 3),
        **({"p50_off_over_before": round(p50["off"] / p50["before"], 3),
            "throughput_off_over_before": round(rps["off"] / rps["before"], 3)} if "before" in p50 else {}),
        "spans_received_per_traced_call": round(spans / traced_calls, 1),
        "off_span_helper_ns": round(helper, 1),
        # About fifteen helper calls per realtime call while off (API and worker together).
        "off_helpers_share_of_p50": f"{HELPERS_PER_CALL * helper / (p50['off'] * 1e6):.1e}",
    }
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "before": args.before,
        "setup": f"tiny random model, 8 documents of ~30 words per call, {args.rounds} alternating rounds of "
                 f"{args.calls} sequential calls (interleaved across stacks) and 4 bursts of {args.calls // 2} calls from 8 "
                 f"threads per stack; CPU, other work on the machine (see load)",
        "figures": figures}
    print(json.dumps(record, indent=2))
    out = Path(args.out) if args.out else RESULTS / f"tracing-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
