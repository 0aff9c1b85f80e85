"""CPU dtypes and backends side by side: the service with `DTYPE=float32` (the reference path),
with torch's bf16 path (`CPU_BACKEND=torch`, bf16 where the CPU has native bf16 matrix units) and
at the defaults (`auto`: on a CPU with AMX, OpenVINO bf16), in one run, on the bge-reranker-base
architecture, with Infinity on the same model folder if it is installed.

    python -m bench.cpu                                   # W1, W2, W3 (about 15 minutes on 2 cores)
    python -m bench.cpu --infinity /path/venv/bin/infinity_emb --infinity-args "--engine torch --dtype bfloat16"

W1: one call of 100 FastGPT-like documents (30-400 tokens), `--w1-reps` turns per system.
W2: concurrent clients, 20 documents a call, pairs per second (best of `--repeat` turns).
W3: one document a call, p50 (best of `--repeat` turns), against the in-process engine of the
    same backend and dtype (the stack's overhead: W3's target is in-process + 3 ms).
Systems are loaded side by side and measured in turns (bench/run.py), so the drift of a shared
VM falls on all of them alike. The model is a random-weight XLM-R with base's exact shape and a
4k vocabulary (bench/cpu_fidelity.py builds it): the embedding table's size changes no arithmetic.
Prints figures and the ratios of issue 20's targets; JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.cpu_fidelity import fidelity_model
from bench.measure import Timing, run_clients
from bench.report import RESULTS, machine
from bench.stack import Ceiling, Service
from bench.workloads import make_workloads
from rerank.launch import free_port
from rerank.procs import Proc, base_env, wait_for

TARGETS = {
    "w1_auto_over_float32_p50": ("<=", 0.3),
    "w2_auto_over_float32": (">=", 3.0),
    "w2_auto_over_infinity": (">=", 1.5),
    "w3_auto_added_ms_p50": ("<=", 3.0),
    "w1_torch_bf16_over_float32_p50": ("<=", 0.3),
    "w2_torch_bf16_over_float32": (">=", 3.0),
    "w2_torch_bf16_over_infinity": (">=", 1.5),
    "w3_torch_bf16_added_ms_p50": ("<=", 3.0),
}
#: The services measured: name -> (settings, CPU_BACKEND of the in-process engine W3 compares with).
#: `auto` is the defaults (on a CPU with AMX: OpenVINO bf16); `torch_bf16` torch's bf16 path.
SYSTEMS = {"float32": ({"DTYPE": "float32"}, None),
           "torch_bf16": ({"DTYPE": "auto", "CPU_BACKEND": "torch"}, "torch"),
           "auto": ({}, "auto"),
           "openvino": ({"CPU_BACKEND": "openvino"}, "openvino")}


class Infinity:
    """michaelfeil/infinity's server (`infinity_emb v2`) on the same folder, its /rerank endpoint."""

    def __init__(self, executable: str, extra: str, path: Path, log_dir: Path) -> None:
        self.name = "infinity"
        self.port = free_port()
        argv = [executable, "v2", "--model-id", str(path), "--port", str(self.port), "--host", "127.0.0.1",
                "--device", "cpu", "--no-model-warmup", "--served-model-name", "bench", *shlex.split(extra)]
        self.args = extra
        self.proc = Proc("infinity", argv, base_env(INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1"), log_dir)
        self.url = f"http://127.0.0.1:{self.port}"
        local = threading.local()

        def call(query: str, docs: list[str]) -> int:
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            r = session.post(self.url + "/rerank", json={"query": query, "documents": docs, "model": "bench"},
                             timeout=900)
            if r.status_code != 200:
                raise RuntimeError(f"infinity {r.status_code}: {r.text[:300]}")
            return 200

        self.call = call
        wait_for(lambda: call("warm", ["up"]) == 200 if self._up() else None, 600, "infinity", self.proc)

    def _up(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.proc.stop()


def threads_w1(path: Path, w, threads: list[int], reps: int) -> dict[str, dict[str, float]]:
    """W1 in-process (DTYPE=auto) at each torch thread count: wall and CPU seconds per call, the
    base of docs/cpu.md's extrapolation to 4 and 8 cores."""
    import torch

    from engine import Engine, EngineConfig

    engine = Engine.start(EngineConfig(source=str(path), device="cpu"))
    out = {}
    try:
        engine.score("warm", ["up"])
        for n in threads:
            torch.set_num_threads(n)
            walls, cpus = [], []
            for _ in range(reps):
                query, docs = w.w1[0]
                wall, cpu = time.perf_counter(), time.process_time()
                engine.score(query, docs)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            out[str(n)] = {"wall_s": min(walls), "cpu_s": min(cpus), "dtype": engine.info["dtype"]}
            print(f"  {n} thread(s): {min(walls):.1f} s wall, {min(cpus):.1f} s CPU", flush=True)
    finally:
        engine.stop()
    return out


def ratios(r: dict) -> dict[str, float]:
    out = {}
    f, i = r.get("float32", {}), r.get("infinity", {})
    for name in ("auto", "torch_bf16", "openvino"):
        a, c = r.get(name, {}), r.get(f"ceiling_{name}", {})
        if "w1" in f and "w1" in a:
            out[f"w1_{name}_over_float32_p50"] = a["w1"]["p50_ms"] / f["w1"]["p50_ms"]
        if "w2" in f and "w2" in a:
            out[f"w2_{name}_over_float32"] = a["w2"]["pairs_per_s"] / f["w2"]["pairs_per_s"]
        if "w2" in i and "w2" in a:
            out[f"w2_{name}_over_infinity"] = a["w2"]["pairs_per_s"] / i["w2"]["pairs_per_s"]
        if "w3" in a and "w3" in c:
            out[f"w3_{name}_added_ms_p50"] = a["w3"]["p50_ms"] - c["w3"]["p50_ms"]
        if "w1" in i and "w1" in a:
            out[f"w1_{name}_over_infinity_p50"] = a["w1"]["p50_ms"] / i["w1"]["p50_ms"]
    return out


def table(report: dict) -> str:
    r, q = report["results"], report["ratios"]
    order = ["float32", *(x for n in ("torch_bf16", "auto", "openvino") for x in (f"ceiling_{n}", n)), "infinity"]
    systems = [s for s in order if r.get(s)]
    rows = [("workload", "metric", *systems)]

    def fig(value):
        if value is None:
            return "–"
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"

    for wl, key, label in (("w1", "p50_ms", "latency p50 ms"), ("w1", "p95_ms", "latency p95 ms"),
                           ("w2", "pairs_per_s", "pairs/s"), ("w2", "p95_ms", "latency p95 ms"),
                           ("w3", "p50_ms", "latency p50 ms"), ("w3", "p95_ms", "latency p95 ms")):
        rows.append((wl, label, *(fig(r[s].get(wl, {}).get(key)) for s in systems)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(v).ljust(wd) for v, wd in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * wd for wd in widths))
    lines.append("")
    for key, value in q.items():
        op, target = TARGETS.get(key, ("", None))
        met = "" if target is None else ("met" if (value <= target if op == "<=" else value >= target) else "NOT met")
        lines.append(f"{key:32} {value:8.3f}   {'' if target is None else f'target {op} {target:g}: {met}'}")
    dtypes = report.get("dtypes", {})
    for n, t in r.get("w1_threads", {}).items():
        lines.append(f"W1 in-process ({t['dtype']}), {n} torch thread(s): {t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU")
    for name, info in dtypes.items():
        lines.append(f"{name}: dtype {info.get('dtype')} ({info.get('dtype_reason')}), "
                     f"{info.get('max_batch_tokens')} tokens per batch, capacity {info.get('capacity')} tokens/s")
    if report.get("infinity_args"):
        lines.append(f"infinity: {report['infinity_args']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="w1,w2,w3",
                        help="w1, w2, w3, and threads (W1 in-process at 1 and 2 torch threads)")
    parser.add_argument("--w1-reps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="W2 and W3 turns per system; the best counts")
    parser.add_argument("--w2-clients", type=int, default=8)
    parser.add_argument("--w2-requests", type=int, default=2)
    parser.add_argument("--w3-requests", type=int, default=40)
    parser.add_argument("--systems", default="float32,torch_bf16,auto",
                        help="services to measure (openvino only where it is installed): " + ", ".join(SYSTEMS))
    parser.add_argument("--infinity", help="infinity_emb executable (a venv of its own); unset: not measured")
    parser.add_argument("--infinity-args", default="--engine torch --dtype bfloat16")
    parser.add_argument("--infinity-model", help="the folder Infinity loads (default: the service's); its "
                                                 "--engine optimum needs the same model exported to ONNX")
    parser.add_argument("--extra", default="", help="more settings of both services, e.g. TORCH_THREADS=1")
    parser.add_argument("--out", help="JSON file (default bench/results/cpu-dtypes-<date>.json)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    names = [n for n in args.systems.split(",") if n != "openvino" or _openvino_installed()]
    path = fidelity_model("base")
    from transformers import AutoTokenizer

    w = make_workloads(AutoTokenizer.from_pretrained(str(path)), seed=1234, w1_docs=100, w2_clients=args.w2_clients,
                       w2_requests=args.w2_requests, w3_requests=args.w3_requests, w4_pairs=1, doc_tokens=(30, 400))
    log_dir = Path(tempfile.mkdtemp(prefix="rerank-bench-cpu-"))
    extra = dict(kv.split("=", 1) for kv in args.extra.split(",") if kv)
    systems: list = []
    results: dict[str, dict] = {}
    dtypes = {}
    ceilings: list = []
    if "threads" in only:
        print("W1 in-process by torch threads …", flush=True)
        results["w1_threads"] = threads_w1(path, w, [1, 2], args.w1_reps)
    try:
        for name in names if only - {"threads"} else ():
            service = Service(path, log_dir, "cpu", name=name, extra={**SYSTEMS[name][0], **extra})
            systems.append(service)
            info = service.worker_info()
            dtypes[name] = {k: info.get(k) for k in ("dtype", "dtype_reason", "max_batch_tokens", "capacity")}
        if args.infinity:
            systems.append(Infinity(args.infinity, args.infinity_args, Path(args.infinity_model or path), log_dir))
        if "w3" in only:
            for name in names:
                if SYSTEMS[name][1] is None:
                    continue
                ceiling = Ceiling(path, "cpu", pretokenized=False, cpu_backend=SYSTEMS[name][1])
                ceiling.name = f"ceiling_{name}"
                ceiling.call("warm", ["up"])
                ceilings.append(ceiling)
        for s in systems:
            results[s.name] = {}
        if "w1" in only:
            print("W1 …", flush=True)
            runs = {s.name: Timing() for s in systems}
            for _ in range(args.w1_reps):
                for s in systems:
                    runs[s.name].latencies += run_clients(s.call, [w.w1]).latencies
            for name, timing in runs.items():
                results[name]["w1"] = timing.summary()
        if "w2" in only:
            print(f"W2 ({len(w.w2)} clients × {args.w2_requests} calls × 20 documents) …", flush=True)
            for _ in range(args.repeat):
                for s in systems:
                    summary = run_clients(s.call, w.w2).summary()
                    if summary["pairs_per_s"] > results[s.name].get("w2", {}).get("pairs_per_s", 0):
                        results[s.name]["w2"] = summary
        if "w3" in only:
            print("W3 …", flush=True)
            for ceiling in ceilings:
                results[ceiling.name] = {}
            for _ in range(args.repeat):
                for s in [*ceilings, *systems]:
                    timing = s.clients([w.w3]) if s in ceilings else run_clients(s.call, [w.w3])
                    summary = timing.summary()
                    if summary["p50_ms"] < results[s.name].get("w3", {}).get("p50_ms", float("inf")):
                        results[s.name]["w3"] = summary
    except BaseException:
        print(f"the run failed: its logs are kept in {log_dir}", flush=True)
        raise
    finally:
        for s in systems:
            s.close()
        for ceiling in ceilings:
            ceiling.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    # Other work on the box slows every system alike but shows in absolute figures: say how busy it was.
    report = {"machine": {**machine(), "load_average_at_end": os.getloadavg()},
              "model": "base architecture, random weights, 4k vocabulary",
              "workloads": {"w1_docs": 100, "w1_reps": args.w1_reps, "w2_clients": args.w2_clients,
                            "w2_requests_per_client": args.w2_requests, "w2_docs": 20,
                            "w3_requests": args.w3_requests, "repeat_best_of": args.repeat, "doc_tokens": [30, 400]},
              "extra_settings": extra, "dtypes": dtypes, "infinity_args": args.infinity_args if args.infinity else None,
              "infinity_model": args.infinity_model,
              "results": results}
    report["ratios"] = ratios(results)
    report["table"] = table(report)
    print("\n" + report["table"])
    out = Path(args.out) if args.out else RESULTS / f"cpu-dtypes-{report['machine']['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


def _openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
