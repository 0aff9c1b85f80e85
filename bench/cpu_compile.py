"""torch.compile (inductor) on a CPU against eager, float32 and bf16 matmuls, on the engine's shapes.

    python -m bench.cpu_compile --arch base            # JSON under bench/results/

A random-weight model of the bge config (bench.cpu_fidelity's, 4k vocabulary) scores FastGPT-like
lists (bench.run's workload) in the batches the engine's budget cuts them into (rows x longest
row <= 2048), four ways: eager float32 (the reference), eager bf16 matmuls (`DTYPE=auto` on a CPU
with bf16 units: engine/backends/cpu_dtype.py), and each of those through `torch.compile`
(inductor, default options, dynamic shapes as torch picks them). Printed: the compile time of the
first batch and of the later ones (each new shape may recompile), the recompiles counted by
dynamo, then the pairs/s of every variant over the same batches, the variants taken in turns,
`--reps` times (median), with each one's ratio to eager of the same dtype; and each variant's
fidelity against float32 eager (bench.cpu_fidelity.compare: largest / mean logit difference, top-5 /
top-10 order changes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.cpu_fidelity import RESULTS, batches, compare, fidelity_model, lists_for


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="base")
    p.add_argument("--lists", type=int, default=3)
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="eager_float32,compiled_float32,eager_bf16,compiled_bf16")
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args(argv)

    import torch
    import torch._dynamo
    from transformers import AutoModelForSequenceClassification

    from engine.backends import PaddedBatch
    from engine.backends.cpu_dtype import bf16_matmuls
    from engine.encoding import Encoder

    torch.set_num_threads(args.threads)
    path = fidelity_model(args.arch)
    encoder = Encoder.load(str(path), 512)
    work = [encoder.encode(q, d) for q, d in lists_for(path, args.lists, args.docs, args.seed)]
    # every batch: (list index, pair indices, padded ids, mask)
    jobs = []
    for k, enc in enumerate(work):
        ends = np.cumsum(enc.lengths)
        seqs = [enc.ids[e - n: e] for e, n in zip(ends, enc.lengths)]
        for idx in batches(enc.lengths, args.budget):
            b = PaddedBatch.of([seqs[i].tolist() for i in idx], pad_id=1)
            jobs.append((k, idx, torch.from_numpy(b.ids), torch.from_numpy(b.mask())))
    pairs = sum(len(j[1]) for j in jobs)
    print(f"{args.arch}: {len(work)} lists, {pairs} pairs in {len(jobs)} batches, shapes "
          f"{sorted({tuple(j[2].shape) for j in jobs})}", flush=True)

    def load(bf16: bool):
        m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        if bf16:
            bf16_matmuls(m)
        return m

    models, compile_log = {}, {}
    for name in args.variants.split(","):
        kind, dtype = name.split("_", 1)
        model = load(dtype == "bf16")
        if kind == "compiled":
            torch._dynamo.reset()
            model = torch.compile(model)
        models[name] = model

    def run(model):
        logits = [np.zeros(len(e.lengths)) for e in work]
        with torch.inference_mode():
            for k, idx, ids, mask in jobs:
                logits[k][idx] = model(input_ids=ids, attention_mask=mask).logits.float().view(-1).numpy()
        return logits

    def first_pass(name):
        """Each batch once, timed one by one: compile time and recompiles (compiled variants)."""
        from torch._dynamo.utils import counters

        counters.clear()
        per_batch = []
        logits = [np.zeros(len(e.lengths)) for e in work]
        with torch.inference_mode():
            for k, idx, ids, mask in jobs:
                t = time.perf_counter()
                logits[k][idx] = models[name](input_ids=ids, attention_mask=mask).logits.float().view(-1).numpy()
                per_batch.append(round(time.perf_counter() - t, 2))
        frames = dict(counters.get("stats", {}))
        return logits, {"first_pass_seconds_per_batch": per_batch, "dynamo_stats": {k: int(v) for k, v in frames.items()},
                        "recompiles": int(counters.get("recompiles", {}).__len__())}

    first = {}
    for name in models:
        logits, info = first_pass(name)
        first[name] = logits
        compile_log[name] = info
        print(f"{name:18} first pass per batch (s): {info['first_pass_seconds_per_batch']}  "
              f"dynamo: {info['dynamo_stats']}", flush=True)
        # a second pass over the same shapes: nothing may compile again
        t = time.perf_counter()
        run(models[name])
        compile_log[name]["second_pass_seconds"] = round(time.perf_counter() - t, 2)
        print(f"{name:18} second pass {compile_log[name]['second_pass_seconds']} s", flush=True)

    wall: dict[str, list[float]] = {n: [] for n in models}
    cpu: dict[str, list[float]] = {n: [] for n in models}
    outputs = {}
    for rep in range(args.reps):
        for name, model in models.items():  # in turns: the same load on every variant
            t, c = time.perf_counter(), time.process_time()
            outputs[name] = run(model)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    ref = outputs.get("eager_float32")
    rows = {}
    print(f"\n{'variant':18} {'pairs/s':>8} {'vs eager same dtype':>20} {'CPU s':>7} {'logit max/mean diff vs f32 eager':>34}"
          f" {'top5/top10 changed':>19}")
    for name in models:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        same = "eager_" + name.split("_", 1)[1]
        ratio = statistics.median(wall[same]) / w if same in wall else float("nan")
        cpu_ratio = statistics.median(cpu[same]) / c if same in cpu else float("nan")
        fid = compare(ref, outputs[name]) if ref is not None and name != "eager_float32" else None
        same_fid = compare(outputs[same], outputs[name]) if same in outputs and same != name else None
        rows[name] = {"pairs_per_s": pairs / w, "fidelity_vs_eager_same_dtype": same_fid, "wall_s": wall[name], "cpu_s": cpu[name],
                      "speedup_vs_eager_same_dtype_wall": ratio, "speedup_vs_eager_same_dtype_cpu": cpu_ratio,
                      "fidelity_vs_eager_float32": fid, **compile_log[name]}
        fs = (f"{fid['logit_max_diff']:.5f} / {fid['logit_mean_diff']:.5f}" if fid else "-")
        tc = (f"{fid['top5_changed'] * fid['lists']:.0f}/{fid['lists']}, {fid['top10_changed'] * fid['lists']:.0f}/{fid['lists']}"
              if fid else "-")
        print(f"{name:18} {pairs / w:8.2f} {ratio:9.2f} x (CPU {cpu_ratio:.2f} x) {c:7.1f} {fs:>34} {tc:>19}"
              + (f"   vs eager same dtype: max {same_fid['logit_max_diff']:.5f}" if same_fid else ""))
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "arch": args.arch,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "load_average_at_end": os.getloadavg(), "threads": args.threads, "pairs": pairs,
           "batches": [list(j[2].shape) for j in jobs], "reps": args.reps, "variants": rows}
    target = Path(args.out) if args.out else RESULTS / f"cpu-compile-{args.arch}-{datetime.now():%Y-%m-%d}.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {target}")


if __name__ == "__main__":
    main()
