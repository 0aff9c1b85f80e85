"""The inputs and the workloads of bench/run.py, one function a workload, each run on every system
in turns (see bench/stack.py), returning its figures per system's name:

    W1  one call of 100 documents, latency                 `w1`
    W2  concurrent clients of 20-document calls, pairs/s    `w2` (and `seed_profile`, on a CPU)
    W3  one document a call, latency                        `w3`
    W4  a bulk job through the jobs API, pairs/s            `w4`
    W5  a cold start's burst of W2's calls (GPU/sim)        `w5`
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import Timing, http_caller, run_clients
from bench.stack import Ceiling, Service, cpu_per_pair
from rerank.random_model import documents_of_length


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


def w1(systems: list, ceiling: Ceiling, w: Workloads, reps: int) -> dict[str, dict]:
    """One call of `w.w1` on each system in turns, `reps` times; latencies of all of them."""
    runs = {s.name: Timing() for s in systems}
    for _ in range(reps):
        for system in systems:
            timing = ceiling.clients([w.w1]) if system is ceiling else run_clients(system.call, [w.w1])
            runs[system.name].latencies += timing.latencies
    return {name: timing.summary() for name, timing in runs.items()}


def w2(systems: list, ceiling: Ceiling, w: Workloads, repeat: int) -> dict[str, dict]:
    """The clients of `w.w2` at once (the ceiling: all their requests as one), `repeat` turns; the
    best pairs/s counts. A service's figures carry its CPU per pair (`cpu_per_pair`)."""
    best: dict[str, dict] = {}
    for _ in range(repeat):
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
    return best


def w3(systems: list, ceiling: Ceiling, w: Workloads, repeat: int) -> dict[str, dict]:
    """The one-document calls of `w.w3` one after another, `repeat` turns; the best p50 counts."""
    best: dict[str, dict] = {}
    for _ in range(repeat):
        for system in systems:
            timing = ceiling.clients([w.w3]) if system is ceiling else run_clients(system.call, [w.w3])
            summary = timing.summary()
            if summary["p50_ms"] < best.get(system.name, {}).get("p50_ms", float("inf")):
                best[system.name] = summary
    return best


def w4(ceiling: Ceiling, services: list[Service], w: Workloads, gpu: bool) -> dict[str, dict]:
    """`w.w4` as bulk jobs on each service, the ceiling scoring the same pairs whole; per system
    `{"w4": ...}`, and for a service its CPU per pair, upload time and `w4_profile` too."""
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
    out: dict[str, dict] = {}
    for name, timing in totals.items():
        out[name] = {"w4": {"pairs_per_s": timing.pairs / timing.wall, "pairs": timing.pairs,
                            "seconds": timing.wall}}
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
    return out


def w5(path: Path, w: Workloads, log_dir: Path, device: str) -> dict[str, float]:
    """A fresh stack; the moment it answers ready, 64 clients send FastGPT-like calls (closed loop)."""
    service = Service(path, log_dir, device, name="cold", warm=False)
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

