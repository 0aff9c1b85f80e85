"""Side-by-side benchmark: the model in-process (ceiling), a server that scores as FastGPT's
original bge-rerank server does, one request at a time (naive), and this service end to end
(gunicorn API, Redis, Celery worker, engine process), on the same machine, model folders and
inputs, measured in turns. Prints one table of figures and ratios and writes it as JSON under
bench/results/.

    python -m bench.run                         # CPU: everything (about 30 minutes on 2 cores)
    python -m bench.run --only w2,w3 --quick    # a smaller, faster pass
    python -m bench.run --device sim            # the GPU path on a simulated H100 (engine/backends/sim.py)
    python -m bench.run --device cuda           # on a GPU machine
    python -m bench.run --device sim --only w2,w3 --baseline db734d8   # and that commit's code, in turns

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

Where its pieces are: bench/stack.py (the systems and the processes they start, with
rerank/procs.py's helpers), bench/workloads.py (the inputs, and one function a workload, W1-W5),
bench/measure.py (timings, concurrent clients, CPU seconds of processes), bench/report.py (targets,
ratios, the table, the JSON). This module loads the systems, runs the workloads and writes the report.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import workloads
from bench.report import machine, write
from bench.stack import Ceiling, Naive, Service, commit_tree, model_dir
from bench.workloads import Workloads, make_workloads, seed_profile
from rerank.procs import ROOT


def measure(path: Path, w: Workloads, only: set[str], log_dir: Path, args) -> dict[str, dict]:
    """Every requested workload on every system, in turns.

    All systems stay loaded while the others run (idle processes cost nothing measurable), and
    every measurement alternates between them, so the slow drift of this VM's speed (~10 %) falls
    on all of them alike instead of on whichever happened to run last."""
    gpu = args.device != "cpu"
    out: dict[str, dict] = {"ceiling": {}, "naive": {}, "before": {}, "service": {}}
    naive = Naive(path, log_dir, args.device) if only & {"w1", "w2", "w3"} else None
    counts = [int(n) for n in str(args.feeders).split(",")]
    service = Service(path, log_dir, args.device, feeders=counts[0] or None)
    more = [Service(path, log_dir, args.device, name=f"service_n{n}", feeders=n) for n in counts[1:]]
    if args.celery_path:  # the same layout, synchronous calls sent as Celery tasks (REALTIME_PATH=celery)
        more.append(Service(path, log_dir, args.device, name="service_celery", feeders=counts[0] or None,
                            extra={"REALTIME_PATH": "celery"}))
    if args.baseline_code is not None:  # the same layout, another commit's code
        more.append(Service(path, log_dir, args.device, name="service_baseline", feeders=counts[0] or None,
                            code=args.baseline_code))
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
            for name, summary in workloads.w1(systems, ceiling, w, args.w1_reps).items():
                out[name]["w1"] = summary
        if "w2" in only:
            print(f"  W2 ({len(w.w2)} clients) …", flush=True)
            for name, summary in workloads.w2(systems, ceiling, w, args.repeat).items():
                out[name]["w2"] = summary
            if not gpu:
                out["ceiling"]["w2_seed_scoring_in_process"] = seed_profile(ceiling, w)
        if "w3" in only:
            print("  W3 …", flush=True)
            for name, summary in workloads.w3(systems, ceiling, w, args.repeat).items():
                out[name]["w3"] = summary
        if "w4" in only:
            print(f"  W4 ({sum(len(d) for _, d in w.w4)} pairs) …", flush=True)
            for name, figures in workloads.w4(ceiling, services, w, gpu).items():
                out[name].update(figures)
    finally:
        for system in systems:
            if system is not ceiling:
                system.close()
        ceiling.close()
        gc.collect()
    if "w5" in only and gpu:
        print("  W5 (cold start burst) …", flush=True)
        out["service"]["w5"] = workloads.w5(path, w, log_dir, args.device)
    return out


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
    parser.add_argument("--celery-path", action="store_true",
                        help="also measure the service with synchronous calls sent as Celery tasks "
                             "(REALTIME_PATH=celery), side by side with the direct path")
    parser.add_argument("--baseline", metavar="REF",
                        help="also measure this commit's code (git archive of REF, this virtual environment) as "
                             "service_baseline, the same layout, in turns with the rest: what a change gained")
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
    # Only the code differs: its model folders and caches are this run's.
    args.baseline_code = commit_tree(args.baseline, log_dir / "baseline-code") if args.baseline else None
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
              "baseline": (subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip() or args.baseline) if args.baseline else None,
              "workloads": {"repeat_best_of": args.repeat, "w1_docs": 100, "w1_reps": args.w1_reps,
                            "w2_clients": args.w2_clients, "w2_requests_per_client": args.w2_requests,
                            "w3_requests": args.w3_requests, "w4_pairs": sum(len(d) for _, d in w.w4),
                            "doc_tokens": [150, 650] if gpu else [30, 400]},
              "results": results}
    write(report, args.device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
