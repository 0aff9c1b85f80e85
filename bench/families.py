"""Qwen3-Reranker-0.6B beside bge-reranker-base: pairs/s and 1-document latency, ratios in one run.

Random weights of the real configs (rerank/random_model.py: Qwen3-0.6B's config.json shape with its
151 669-token vocabulary; XLM-R base), loaded through the engine (Engine.start: family, backend,
batcher), scored on the same FastGPT-like texts:

    python -m bench.families                       # CPU: bf16 where the CPU has AVX512-BF16/AMX
    python -m bench.families --device sim          # the simulated H100 (engine/backends/sim.py)
    python -m bench.families --device cuda --pairs 1024 --models bge-reranker-base qwen3-reranker-0.6b \
        qwen3-reranker-4b                          # a GPU, with model FLOP/s and MFU (figures owed)

pairs/s: `--pairs` (query, document) pairs of `--tokens` document tokens as one call at full
batches; latency: median of `--reps` calls of one short document. On DEVICE=sim the scores are
placeholders and the times are the simulated H100's: the output says `simulated`. Model FLOP/s
count engine/backends/sim.py's `flops_per_token` over the pairs' real lengths; MFU (CUDA only) is
that over 790 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import Engine, EngineConfig  # noqa: E402
from rerank.random_model import build_model, documents_of_length, sentence  # noqa: E402

ARCHS = {"bge-reranker-base": "base", "qwen3-reranker-0.6b": "qwen3-0.6b", "qwen3-reranker-4b": "qwen3-4b"}
#: Shapes for the FLOP count (engine/backends/sim.py's formula); XLM-R base beside the derived ones.
BASE_SHAPE = dict(hidden=768, layers=12, heads=12, kv_heads=12, head_dim=64, intermediate=3072,
                  gated=False, causal=False, kernels=1.0)
#: Dense fp16/bf16 tensor FLOP/s the utilisation is counted against (bench/gpu.py's H100 figure).
PEAK_FLOPS = 790e12


def cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure(folder: Path, device: str, dtype: str, pairs: int, tokens: int, reps: int, threads: int | None,
            shape: dict) -> dict:
    from transformers import AutoTokenizer

    from engine.backends.sim import flops_per_token

    import random

    engine = Engine.start(EngineConfig(source=str(folder), device=device, dtype=dtype, max_length=512,
                                       torch_threads=threads))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        docs = documents_of_length(tok, [tokens] * pairs, seed=1)
        query = sentence(random.Random(2), 8)
        engine.score(query, docs[:2])  # warm
        started = time.perf_counter()
        scored = engine.score(query, docs)
        seconds = time.perf_counter() - started
        encoded = engine.encoder.encode(query, docs)
        flops = sum(n * flops_per_token(shape, int(n)) for n in encoded.lengths)
        one = []
        for k in range(reps):
            t = time.perf_counter()
            engine.score(query, [docs[k % len(docs)][:200]])
            one.append(time.perf_counter() - t)
        return {"pairs_per_second": round(pairs / seconds, 2), "latency_1doc_ms": round(1000 * statistics.median(one), 2),
                "input_tokens": scored.input_tokens, "device": engine.info["device"], "dtype": engine.info["dtype"],
                "backend": engine.info.get("backend"), "family": engine.info["family"],
                "capacity": engine.info["capacity"], "model_tflops_per_second": round(flops / seconds / 1e12, 3),
                "mfu_vs_790_tflops": round(flops / seconds / PEAK_FLOPS, 4) if device.startswith("cuda") else None}
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a CPU that has it, else auto")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=100, help="document tokens per pair")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=["bge-reranker-base", "qwen3-reranker-0.6b"],
                        choices=sorted(ARCHS), help="qwen3-reranker-4b too on a GPU")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "cpu" and cpu_bf16() else "auto")
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
              "simulated": args.device == "sim", "dtype": dtype, "pairs": args.pairs, "doc_tokens": args.tokens,
              "cpu": platform.processor() or platform.machine(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from engine.backends.sim import DERIVED

        for name in args.models:
            arch = ARCHS[name]
            folder = build_model(Path(tmp) / name, arch, weights=args.device != "sim")
            result["models"][name] = measure(folder, args.device, dtype, args.pairs, args.tokens, args.reps,
                                             args.threads, DERIVED.get(arch, BASE_SHAPE))
            print(name, json.dumps(result["models"][name]), flush=True)
    base, qwen = result["models"]["bge-reranker-base"], result["models"]["qwen3-reranker-0.6b"]  # both needed
    result["ratios"] = {
        "pairs_per_second_base_over_qwen3": round(base["pairs_per_second"] / qwen["pairs_per_second"], 2),
        "latency_1doc_qwen3_over_base": round(qwen["latency_1doc_ms"] / base["latency_1doc_ms"], 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
