"""Resident memory of the engine's torch backend under batches of many shapes, float32 against bf16.

The worker with its engine grew 660 -> 1035 MiB under tests/test_hardening.py's load with
DTYPE=auto (bf16 matrix multiplications) and by under 64 MiB in float32 (docs/cpu.md, "Memory
under varied load"). This runs the backend the engine loads (engine/backends/torch_eager.py) in a
process of its own per variant, on batches of random shapes within `MAX_BATCH_TOKENS`, and prints
the RSS after every step of batches and the number of distinct shapes seen so far: a cache per
shape grows with the distinct shapes and stops when they do (or when the cache is full); a leak
grows with the batches.

    python -m bench.cpu_memory --arch tiny --batches 3000 --variants float32,bf16-before,bf16-caches64
    python -m bench.cpu_memory --arch base --model bench/.cache/fidelity-base --batches 150 --step 50 \
        --max-tokens 512 --max-width 128 --rounds 2 --variants bf16-before,bf16-caches64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

#: name -> (DTYPE, extra environment, pad batch shapes to CUDA-graph-like buckets). `before`: the
#: bf16 path as it was (both kernel caches at their 1024-entry default); `bf16`: as the engine runs
#: it now (both caches at 64 entries: engine.runtime.bound_kernel_caches). Padding the rows of each
#: bf16 multiplication to a multiple of 64 (`bf16-rows64` in bench/results/cpu-memory-*-2026-12-03.json)
#: was tried and dropped: it bounded the shapes but cost 9 % CPU on base (docs/cpu.md).
_DEFAULT = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}
_BOUND = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
VARIANTS = {
    "float32": ("float32", {}, False),
    "bf16-before": ("bfloat16", {**_DEFAULT}, False),
    "bf16-before-trim": ("bfloat16", {**_DEFAULT, "TRIM": "1"}, False),
    "bf16-onednn-cache0": ("bfloat16", {**_DEFAULT, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, False),
    "bf16-onednn-cache0-trim": ("bfloat16", {**_DEFAULT, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
                                             "TRIM": "1"}, False),
    "bf16-caches64": ("bfloat16", {**_BOUND}, False),
    "bf16-buckets": ("bfloat16", {**_DEFAULT}, True),
    "bf16": ("bfloat16", {**_BOUND}, False),
    # CPU_BACKEND=openvino: its CPU plugin's per-shape cache bounded as the engine does (64), and at
    # OpenVINO's default (5 000).
    "openvino": ("auto", {"CPU_BACKEND": "openvino"}, False),
    "openvino-cache5000": ("auto", {"CPU_BACKEND": "openvino", "CPU_RUNTIME_CACHE_CAPACITY": "5000"}, False),
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(args) -> None:
    import numpy as np
    import torch

    from engine.backends import PaddedBatch
    from engine.backends import load_backend

    torch.set_num_threads(args.threads)
    dtype, _, buckets = VARIANTS[args.variant]
    backend = load_backend(SimpleNamespace(source=args.model, device="cpu", dtype=dtype, family=None,
                                           cpu_backend=os.environ.get("CPU_BACKEND", "torch"),
                                           torch_threads=args.threads, torch_compile=False))
    rng = random.Random(args.seed)
    shapes: set[tuple[int, int]] = set()
    ms: set[int] = set()
    out = []
    start_rss = rss_mib()
    t0, c0 = time.monotonic(), time.process_time()
    for i in range(1, args.batches + 1):
        width = rng.randint(4, args.max_width)
        if buckets:
            width = 16 if width <= 16 else -(-width // 32) * 32
        rows = rng.randint(1, max(1, args.max_tokens // width))
        if buckets:
            rows = 1 << max(rows - 1, 0).bit_length()
            rows = min(rows, max(1, args.max_tokens // width))
        lengths = np.array([rng.randint(2, width) for _ in range(rows)], dtype=np.int32)
        lengths[0] = width
        ids = np.full((rows, width), backend.pad_id, dtype=np.int64)
        for r, n in enumerate(lengths):
            ids[r, :n] = np.array([rng.randint(5, 200) for _ in range(n)])
        batch = PaddedBatch(ids=ids, lengths=lengths)
        backend.finish(backend.launch(backend.prepare(batch)))
        shapes.add((rows, width))
        ms.add(rows * width)
        if i % args.step == 0:
            if os.environ.get("TRIM"):  # hand freed heap back to the OS: what stays is live memory
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            out.append({"batches": i, "shapes": len(shapes), "row_x_width": len(ms), "rss_mib": round(rss_mib(), 1)})
            print(json.dumps({"variant": args.variant, **out[-1]}), flush=True)
    print("RESULT " + json.dumps({"variant": args.variant, "start_rss_mib": round(start_rss, 1),
                                  "seconds": round(time.monotonic() - t0, 1),
                                  "cpu_seconds": round(time.process_time() - c0, 1), "steps": out}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="tiny")
    p.add_argument("--model", help="a model folder (default: a random one of --arch, built in a temp dir)")
    p.add_argument("--variants", default="float32,bf16-before,bf16")
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--step", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--max-width", type=int, default=160)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help="run the variants in turns this many times")
    p.add_argument("--out")
    args = p.parse_args()
    if args.variant:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            from rerank.random_model import build_model

            args.model = str(build_model(Path(tmp) / args.arch, args.arch))
        results = []
        for name in args.variants.split(",") * args.rounds:
            _, extra, _ = VARIANTS[name]
            cmd = [sys.executable, "-m", "bench.cpu_memory", "--variant", name, "--model", args.model,
                   "--batches", str(args.batches), "--step", str(args.step), "--max-tokens", str(args.max_tokens),
                   "--max-width", str(args.max_width), "--threads", str(args.threads), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, env={**os.environ, **extra}, capture_output=True, text=True)
            sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
            for line in proc.stdout.splitlines():
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
                else:
                    print(line, flush=True)
        print("\nvariant              start  after-first-step    end  growth after first step  distinct rows x width"
              "   wall s   CPU s   CPU vs first variant of its round")
        first = None
        for k, r in enumerate(results):
            s = r["steps"]
            if k % len(args.variants.split(",")) == 0:
                first = r["cpu_seconds"]
            print(f"{r['variant']:20} {r['start_rss_mib']:6.0f} {s[0]['rss_mib']:10.0f} {s[-1]['rss_mib']:10.0f} "
                  f"{s[-1]['rss_mib'] - s[0]['rss_mib']:12.0f} {s[-1]['row_x_width']:18d} {r['seconds']:12.1f}"
                  f" {r['cpu_seconds']:7.1f} {r['cpu_seconds'] / first:8.2f}")
        if args.out:
            Path(args.out).write_text(json.dumps({"arch": args.arch, "args": {k: v for k, v in vars(args).items()
                                                                               if k not in ("variant", "model")},
                                                  "uptime": os.getloadavg(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
