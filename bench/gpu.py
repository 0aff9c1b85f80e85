"""The model alone on a GPU: pairs/s, tokens/s, model FLOP utilisation, and forward passes by shape.

Needs only torch and transformers (no Redis, no server):

    python -m bench.gpu                                   # base, large, v2-m3 x fp16, bf16 x 128..512 (+2048, 8192)
    python -m bench.gpu --archs base --dtypes float16 --shapes   # + eager vs CUDA-graph pass by shape
    python -m bench.gpu --quick --device cpu              # a smoke run of the script itself, anywhere

Random-weight models of the exact bge-reranker configs (docs/reference-scoring.md, "The three
checkpoints") are saved to a temporary folder and loaded through the engine's own backends. "Model
alone" is pre-tokenized pairs of exactly L tokens through the engine's batcher as one request (a
global length sort under the token budget) on the best backend (CUDA graphs where a batch fits a
bucket, eager otherwise); the same pairs sent as many concurrent requests through the batcher are
reported beside it. `--shapes` times single forward passes (launch: until the call returned; total:
until the logits were on the CPU) for eager and replayed passes, in the format of
engine/backends/h100_forward_timing.json (the table `DEVICE=sim` replays). Utilisation = achieved
model FLOP/s over 790 TFLOP/s (docs/gpu.md, "Peak arithmetic"), counting 2 x non-embedding
parameters per token plus 4 x layers x L^2 x hidden per pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import REALTIME, Encoded, EngineConfig  # noqa: E402
from engine.backends import PaddedBatch, load_backend  # noqa: E402
from engine.batcher import Batcher  # noqa: E402
from rerank.random_model import ARCHS, build_model  # noqa: E402

PEAK_FLOPS = 790e12
LENGTHS = {"base": [128, 256, 512], "large": [128, 256, 512], "v2-m3": [128, 256, 512, 2048, 8192]}
SHAPE_ROWS = [1, 4, 16, 64, 256, 1024]
SHAPE_WIDTHS = {"base": [16, 64, 128, 256, 512], "large": [16, 64, 128, 256, 512],
                "v2-m3": [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]}


def flops_per_pair(arch: str, length: int) -> float:
    shape = ARCHS[arch]
    h, layers, ffn = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    non_embedding = layers * (4 * h * h + 2 * h * ffn) + h * h + h  # attention, FFN, classifier head
    attention = 4 * layers * length * length * h
    return 2 * non_embedding * length + attention


def pairs_of_length(length: int, count: int, vocab: int, seed: int = 0) -> Encoded:
    """`count` pair inputs of exactly `length` tokens: <s> q </s></s> d </s> with random ids."""
    rng = np.random.default_rng(seed)
    body = rng.integers(5, vocab - 1, size=(count, length), dtype=np.int32)
    body[:, 0] = 0
    q = max(1, min(32, (length - 4) // 4))
    body[:, q + 1] = body[:, q + 2] = 2
    body[:, -1] = 2
    return Encoded(lengths=np.full(count, length, dtype=np.int32), ids=body.reshape(-1),
                   owners=np.arange(count, dtype=np.int32), documents=count)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(batcher: Batcher, encoded: Encoded, min_seconds: float, device: str) -> float:
    """Seconds per pass over `encoded` as one request (best of the passes within `min_seconds`)."""
    batcher.submit(encoded.lengths[: max(1, encoded.pairs // 8)],
                   encoded.ids[: int(encoded.lengths[: max(1, encoded.pairs // 8)].sum())]).wait()
    sync(device)
    best, spent = float("inf"), 0.0
    while spent < min_seconds or best == float("inf"):
        started = time.perf_counter()
        batcher.submit(encoded.lengths, encoded.ids).wait()
        sync(device)
        took = time.perf_counter() - started
        best, spent = min(best, took), spent + took
    return best


def through_clients(batcher: Batcher, encoded: Encoded, clients: int, per_request: int) -> float:
    """Seconds to score the pairs sent as many concurrent requests of `per_request` pairs."""
    length = int(encoded.lengths[0])
    ids = encoded.ids.reshape(encoded.pairs, length)
    requests = [slice(i, min(i + per_request, encoded.pairs)) for i in range(0, encoded.pairs, per_request)]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not requests:
                    return
                part = requests.pop()
            rows = ids[part]
            batcher.submit(np.full(len(rows), length, dtype=np.int32), rows.reshape(-1), priority=REALTIME).wait()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def time_shape(backend, rows: int, width: int, vocab: int, repeats: int = 5) -> tuple[float, float]:
    """Median (launch ms, total ms) of one forward pass of this shape."""
    batch = PaddedBatch(ids=np.random.default_rng(rows * width).integers(5, vocab - 1, size=(rows, width)),
                        lengths=np.full(rows, width, dtype=np.int32))
    prepared = backend.prepare(batch)
    backend.finish(backend.launch(prepared))  # warm
    launches, totals = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        handle = backend.launch(prepared)
        launched = time.perf_counter()
        backend.finish(handle)
        done = time.perf_counter()
        launches.append((launched - started) * 1000)
        totals.append((done - started) * 1000)
    return statistics.median(launches), statistics.median(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu, or sim (simulated: labelled so)")
    parser.add_argument("--archs", default="base,large,v2-m3")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--tokens-per-run", type=int, default=4_000_000, help="tokens scored per timed pass")
    parser.add_argument("--budget", type=int, default=65536, help="MAX_BATCH_TOKENS (padded tokens per pass)")
    parser.add_argument("--graph-max-tokens", type=int, default=8192, help="CUDA_GRAPH_MAX_TOKENS")
    parser.add_argument("--cuda-graphs", default="on", choices=["on", "off", "both"])
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--lengths", help="tokens per pair to measure, e.g. 512,8192 (default: per model)")
    parser.add_argument("--shapes", action="store_true", help="also time single passes by shape, eager and graph")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for checking the script itself")
    parser.add_argument("--out", help="JSON file (default bench/results/gpu-<date>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens_per_run, args.min_seconds, args.budget = 4096, 0.1, 2048

    rows: list[dict] = []
    shapes: dict[str, list[dict]] = {}
    graphs_info: dict[str, dict] = {}
    scratch = tempfile.TemporaryDirectory(prefix="rerank-gpu-bench-")  # the random models, removed at the end
    tmp = Path(scratch.name)
    for arch in args.archs.split(","):
        folder = build_model(tmp / arch, "tiny" if args.quick else arch, weights=args.device != "sim")
        for dtype in args.dtypes.split(","):
            if args.device == "cpu" and dtype == "float16":
                continue
            modes = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs]
            for graphs in modes:
                config = EngineConfig(source=str(folder), device=args.device, dtype=dtype,
                                      max_length=8192 if arch == "v2-m3" and not args.quick else 512,
                                      max_batch_tokens=args.budget, cuda_graphs=graphs,
                                      graph_max_tokens=args.graph_max_tokens,
                                      sim_profile=None if not args.quick else "base")
                backend = load_backend(config)
                started = time.perf_counter()
                backend.warm_up(args.budget)
                info = backend.describe()
                label = f"{arch}/{dtype}/graphs={'on' if graphs else 'off'}"
                graphs_info[label] = {**info, "warm_up_seconds": round(time.perf_counter() - started, 2)}
                print(f"{label}: {info}", flush=True)
                vocab = 1000 if args.quick else 250002
                limit = 8192 if arch == "v2-m3" and not args.quick else 512
                lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else LENGTHS[arch]
                batcher = Batcher(backend, max_batch_tokens=args.budget).start()
                try:
                    for length in lengths if not args.quick else [128]:
                        if length > limit:
                            continue
                        budget = max(args.budget, length)
                        count = max(budget // length, args.tokens_per_run // length)
                        encoded = pairs_of_length(length, count, vocab)
                        seconds = measure(batcher, encoded, args.min_seconds, args.device)
                        flops = flops_per_pair(arch, length) * count / seconds
                        row = {"arch": arch, "dtype": dtype, "cuda_graphs": graphs, "tokens_per_pair": length,
                               "pairs": count, "batch_pairs": budget // length, "pairs_per_s": count / seconds,
                               "tokens_per_s": count * length / seconds, "tflops": flops / 1e12,
                               "mfu": flops / PEAK_FLOPS, "simulated": args.device == "sim"}
                        if length == 256 or args.quick:
                            took = through_clients(batcher, encoded, clients=64, per_request=20)
                            row["concurrent_20_pair_requests_pairs_per_s"] = count / took
                        if args.device.startswith("cuda"):
                            row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                        rows.append(row)
                        print(f"{label:28} L={length:5} {row['pairs_per_s']:9.4g} pairs/s "
                              f"{row['tokens_per_s'] / 1e6:7.4g} Mtok/s {row['tflops']:6.1f} TFLOP/s "
                              f"MFU {100 * row['mfu']:5.1f} %"
                              + (f"  64 clients x 20: {row['concurrent_20_pair_requests_pairs_per_s']:.0f} pairs/s"
                                 if "concurrent_20_pair_requests_pairs_per_s" in row else "")
                              + ("  (SIMULATED)" if args.device == "sim" else ""), flush=True)
                finally:
                    batcher.stop()
                if args.shapes:
                    table = shapes.setdefault(f"{arch}/{dtype}", [])
                    for r in SHAPE_ROWS if not args.quick else [1, 4]:
                        for w in SHAPE_WIDTHS[arch] if not args.quick else [16, 64]:
                            if r * w * max(1, w / 512) > 4 * args.budget:
                                continue
                            launch, total = time_shape(backend, r, w, vocab)
                            table.append({"rows": r, "width": w, "cuda_graphs": graphs,
                                          "launch_ms": round(launch, 3), "total_ms": round(total, 3)})
                            print(f"  {label} {r:5} x {w:5}: launch {launch:7.3f} ms, total {total:8.3f} ms", flush=True)
                del backend
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()

    report = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
        "simulated": args.device == "sim",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_tokens": args.budget,
        "peak_flops": PEAK_FLOPS,
        "backends": graphs_info,
        "rows": rows,
        "shapes": shapes,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
