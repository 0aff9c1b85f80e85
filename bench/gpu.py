"""GPU benchmark of the worker's scoring path: pairs/s, tokens/s and model FLOP utilisation.

Needs only torch, transformers and sentence-transformers (no Redis, no server):

    python -m bench.gpu                         # base, large, v2-m3 x fp16, bf16 x 128..512 (+2048, 8192)
    python -m bench.gpu --quick --device cpu    # a smoke run of the script itself, anywhere

Random-weight models of the exact bge-reranker configs (CONTRACT §5) are saved to a temporary
folder and loaded through the worker's own `load_reranker`; pairs of exactly L tokens go through
`score_encoded` (sort, token-budget batches, forward) and, for one size, through the
cross-request `Batcher` fed by concurrent requests. Utilisation = achieved model FLOP/s over
790 TFLOP/s (H200 dense bf16, CONTRACT §6), counting 2 x non-embedding parameters per token plus
4 x layers x L^2 x hidden per pair for attention.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rerank.random_model import ARCHS, build_model  # noqa: E402
from worker.batching import REALTIME, Batcher  # noqa: E402
from worker.model import load_reranker  # noqa: E402
from worker.scoring import score_encoded  # noqa: E402

PEAK_FLOPS = 790e12
LENGTHS = {"base": [128, 256, 512], "large": [128, 256, 512], "v2-m3": [128, 256, 512, 2048, 8192]}


def flops_per_pair(model: torch.nn.Module, arch: str, length: int) -> float:
    shape = ARCHS[arch]
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    attention = 4 * shape["num_hidden_layers"] * length * length * shape["hidden_size"]
    return 2 * non_embedding * length + attention


def pairs_of_length(reranker, length: int, count: int, seed: int = 0) -> list[list[int]]:
    """Encoded pairs of exactly `length` tokens (specials included), random ids of the vocabulary."""
    rng = random.Random(seed)
    vocab = len(reranker.tokenizer)
    body = length - reranker.specials
    q = max(1, min(32, body // 4))
    out = []
    for _ in range(count):
        ids = [rng.randrange(5, vocab - 1) for _ in range(body)]
        out.append(reranker.prefix + ids[:q] + reranker.middle + ids[q:] + reranker.suffix)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(reranker, pairs: list[list[int]], budget: int, min_seconds: float) -> float:
    """Seconds per pass over `pairs` (best of the passes made within `min_seconds`, after warm-up)."""
    score_encoded(reranker, pairs[: max(1, len(pairs) // 8)], budget)
    sync(reranker.device)
    best, spent = float("inf"), 0.0
    while spent < min_seconds or best == float("inf"):
        started = time.perf_counter()
        score_encoded(reranker, pairs, budget)
        sync(reranker.device)
        took = time.perf_counter() - started
        best, spent = min(best, took), spent + took
    return best


def through_batcher(reranker, pairs: list[list[int]], budget: int, clients: int, per_request: int) -> float:
    """Seconds to score `pairs` sent as many concurrent requests through the worker's batcher."""
    batcher = Batcher(reranker.launch, collate=reranker.collate, finish=reranker.finish,
                      max_batch_tokens=budget).start()
    requests = [pairs[i : i + per_request] for i in range(0, len(pairs), per_request)]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not requests:
                    return
                req = requests.pop()
            batcher.submit(req, priority=REALTIME).wait()

    try:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started
    finally:
        batcher.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", default="base,large,v2-m3")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--tokens-per-run", type=int, default=4_000_000, help="tokens scored per timed pass")
    parser.add_argument("--budget", type=int, default=65536, help="MAX_BATCH_TOKENS (padded tokens per pass)")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--lengths", help="tokens per pair to measure, e.g. 512,8192 (default: per model)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for checking the script itself")
    parser.add_argument("--out", help="JSON file (default bench/results/gpu-<date>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens_per_run, args.min_seconds, args.budget = 4096, 0.1, 2048

    device = torch.device(args.device)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="rerank-gpu-bench-"))
    for arch in args.archs.split(","):
        folder = build_model(tmp / arch, "tiny" if args.quick else arch)
        for dtype in args.dtypes.split(","):
            if device.type == "cpu" and dtype == "float16":
                continue
            reranker = load_reranker(str(folder), device=str(device), dtype=dtype,
                                     max_length=8192 if arch == "v2-m3" and not args.quick else 512)
            lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else LENGTHS[arch]
            for length in lengths if not args.quick else [128]:
                if length > reranker.limit:
                    continue
                budget = max(args.budget, length)
                count = max(budget // length, args.tokens_per_run // length)
                pairs = pairs_of_length(reranker, length, count)
                seconds = measure(reranker, pairs, budget, args.min_seconds)
                flops = flops_per_pair(reranker.model, arch, length) * count / seconds
                row = {"arch": arch, "dtype": dtype, "tokens_per_pair": length, "pairs": count,
                       "batch_pairs": budget // length, "pairs_per_s": count / seconds,
                       "tokens_per_s": count * length / seconds, "tflops": flops / 1e12,
                       "mfu": flops / PEAK_FLOPS}
                if length == 256 or args.quick:
                    took = through_batcher(reranker, pairs, budget, clients=32, per_request=20)
                    row["batcher_pairs_per_s"] = count / took
                if device.type == "cpu":
                    import resource

                    row["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
                rows.append(row)
                print(f"{arch:6} {dtype:8} L={length:5} {row['pairs_per_s']:9.4g} pairs/s "
                      f"({1 / row['pairs_per_s']:.3g} s a pair) {row['tokens_per_s'] / 1e6:7.4g} Mtok/s {row['tflops']:6.1f} TFLOP/s "
                      f"MFU {100 * row['mfu']:5.1f} %"
                      + (f"  batcher {row['batcher_pairs_per_s']:.0f} pairs/s" if "batcher_pairs_per_s" in row else ""),
                      flush=True)
            if device.type == "cuda":  # peak GPU memory of this model and dtype, weights included
                peak = torch.cuda.max_memory_allocated() / 2**30
                for row in rows:
                    if row["arch"] == arch and row["dtype"] == dtype:
                        row["max_memory_gib"] = round(peak, 2)
            del reranker
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_tokens": args.budget,
        "peak_flops": PEAK_FLOPS,
        "rows": rows,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
