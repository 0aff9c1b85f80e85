"""The clocks of bench/run.py: timings and their percentiles, concurrent HTTP clients, and the CPU
seconds of groups of processes (from /proc)."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


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
    """`call(query, documents)`: one POST /v1/rerank on a kept-alive connection of the calling
    thread's own, its status back.

    A load generator, not a client library: http.client with the body encoded once. On the 2-core
    VM the clients share the cores with the server they measure, and requests cost 0.6-1.0 ms of
    CPU a call against 0.1-0.2 here (bench figures before 2026-12-08 carry that cost: W2's 64
    clients took a share of the cores the service needed, W3 about 0.5 ms of every call)."""
    parts = urlsplit(url)
    local = threading.local()

    def call(query: str, docs: list[str]) -> int:
        body = json.dumps({"query": query, "documents": docs}, ensure_ascii=False).encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: one retry
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=900)
            try:
                conn.request("POST", "/v1/rerank", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                text = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                conn.close()
                local.conn = None
                if attempt == 2:
                    raise
        if strict and response.status != 200:
            raise RuntimeError(f"{response.status}: {text[:200]!r}")
        return response.status

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
