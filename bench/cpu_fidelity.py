"""What bf16 costs in fidelity on a CPU: bf16 scores against the float32 reference, same inputs.

    python -m bench.cpu_fidelity                       # base, large, v2-m3 (about 10 min on 2 cores)
    python -m bench.cpu_fidelity --archs small --lists 4 --docs 20

Random-weight models of the bge configs (rerank/random_model.py; a 4k vocabulary instead of 250k:
the embedding table's size changes no arithmetic) score FastGPT-like lists (bench.run's
workload: queries of 8-32 tokens, documents of 30-400). Each pass is run once per dtype through
the encoder (`model.roberta`), and the classification head is applied to its features in three
ways: all bf16 (what `DTYPE=auto` runs), bf16 encoder with a float32 head, and float32 (the
reference). Random weights give logits packed near zero, so the same is repeated with the head
scaled so that the reference logits of the load spread over [-8, 8], as a real checkpoint's do.

Printed per model and head: the largest and the mean absolute difference of the logit and of the
score (sigmoid), the bf16 error relative to the spread of the reference logits, and the share of
lists whose top 5 / top 10 (as ordered) differ from the reference's. JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
SPREAD = 8.0  # the scaled head's reference logits span [-SPREAD, SPREAD]


def fidelity_model(arch: str) -> Path:
    from rerank.random_model import build_model

    path = CACHE / f"fidelity-{arch}"
    if not (path / "config.json").exists():
        print(f"building a random {arch} model in {path}", flush=True)
        build_model(path, arch, vocab_size=4005)
    return path


def lists_for(path: Path, lists: int, docs: int, seed: int) -> list[tuple[str, list[str]]]:
    from transformers import AutoTokenizer

    from bench.run import make_workloads

    tokenizer = AutoTokenizer.from_pretrained(path)
    w = make_workloads(tokenizer, seed=seed, w1_docs=1, w2_clients=lists, w2_requests=1, w3_requests=1,
                       w4_pairs=1, doc_tokens=(30, 400))
    return [client[0] for client in w.w2]


def batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Pair indices in length order, cut so that rows x longest row stays within `budget`."""
    order = np.argsort(lengths, kind="stable")
    out, current = [], []
    for i in order:
        if current and (len(current) + 1) * int(lengths[i]) > budget:
            out.append(np.asarray(current))
            current = []
        current.append(int(i))
    if current:
        out.append(np.asarray(current))
    return out


def features(model, encoded, budget: int):
    """The classification head's input (`<s>` of the last layer) of every pair, in pair order."""
    import torch

    from engine.backends import PaddedBatch

    ends = np.cumsum(encoded.lengths)
    seqs = [encoded.ids[e - n : e] for e, n in zip(ends, encoded.lengths)]
    out = [None] * len(seqs)
    with torch.inference_mode():
        for idx in batches(encoded.lengths, budget):
            batch = PaddedBatch.of([seqs[i].tolist() for i in idx], pad_id=int(model.config.pad_token_id))
            hidden = model.roberta(input_ids=torch.from_numpy(batch.ids),
                                   attention_mask=torch.from_numpy(batch.mask()))[0][:, :1]
            for row, i in enumerate(idx):
                out[i] = hidden[row : row + 1]
    return torch.cat(out)


def head_logits(head, feats) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return head(feats.to(next(head.parameters()).dtype)).float().view(-1).numpy().astype(np.float64)


def scaled(head, reference: np.ndarray):
    """A copy of the head whose logits on this load are `a * (logit - mid)`, spanning [-8, 8]."""
    import torch

    lo, hi = float(reference.min()), float(reference.max())
    a, mid = 2 * SPREAD / max(hi - lo, 1e-9), (hi + lo) / 2
    head = copy.deepcopy(head)
    with torch.no_grad():
        head.out_proj.weight.mul_(a)
        head.out_proj.bias.copy_(a * (head.out_proj.bias.float() - mid))
    return head


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    """Differences between two scorings of the same lists (logits per list)."""
    ref, oth = np.concatenate(reference), np.concatenate(other)

    def sig(x):
        return 1 / (1 + np.exp(-x))

    def changed(k: int) -> float:
        return float(np.mean([not np.array_equal(np.argsort(-r, kind="stable")[:k], np.argsort(-o, kind="stable")[:k])
                              for r, o in zip(reference, other)]))

    d = np.abs(ref - oth)
    s = np.abs(sig(ref) - sig(oth))
    return {"logit_max_diff": float(d.max()), "logit_mean_diff": float(d.mean()),
            "score_max_diff": float(s.max()), "score_mean_diff": float(s.mean()),
            "error_over_spread": float(np.std(ref - oth) / max(np.std(ref), 1e-12)),
            "reference_logits": [float(ref.min()), float(ref.max())],
            "top5_changed": changed(5), "top10_changed": changed(10), "lists": len(reference),
            "pairs": int(ref.size)}


def measure(arch: str, lists: int, docs: int, budget: int, seed: int) -> dict[str, dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.encoding import Encoder

    path = fidelity_model(arch)
    work = lists_for(path, lists, docs, seed)
    encoder = Encoder.load(str(path), 512)
    encoded = [encoder.encode(q, d) for q, d in work]
    models = {name: AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    feats: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for name, model in models.items():
        started = time.perf_counter()
        feats[name] = [features(model, e, budget) for e in encoded]
        seconds[name] = time.perf_counter() - started
    ref_head, bf_head = models["float32"].classifier, models["bfloat16"].classifier
    ref = [head_logits(ref_head, f) for f in feats["float32"]]
    out = {"seconds": seconds}
    out["random_head"] = {
        "bf16": compare(ref, [head_logits(bf_head, f) for f in feats["bfloat16"]]),
        "bf16_float32_head": compare(ref, [head_logits(ref_head, f) for f in feats["bfloat16"]]),
    }
    big_ref = scaled(ref_head, np.concatenate(ref))
    big_bf = scaled(ref_head, np.concatenate(ref)).to(torch.bfloat16)
    big = [head_logits(big_ref, f) for f in feats["float32"]]
    out["spread_head"] = {
        "bf16": compare(big, [head_logits(big_bf, f) for f in feats["bfloat16"]]),
        "bf16_float32_head": compare(big, [head_logits(big_ref, f) for f in feats["bfloat16"]]),
    }
    return out


def table(results: dict[str, dict]) -> str:
    rows = ["model  | head                | variant           | logit max / mean | score max / mean  "
            "| err/spread | top-5 | top-10 | lists",
            "-------+---------------------+-------------------+------------------+-------------------"
            "+------------+-------+--------+------"]
    for arch, r in results.items():
        for head, label in (("random_head", "random weights"), ("spread_head", f"scaled to ±{SPREAD:g}")):
            for variant, v in r[head].items():
                rows.append(f"{arch:6} | {label:19} | {variant:17} | {v['logit_max_diff']:.4f} / {v['logit_mean_diff']:.4f}"
                            f"  | {v['score_max_diff']:.5f} / {v['score_mean_diff']:.5f} | {v['error_over_spread']:10.4f}"
                            f" | {v['top5_changed']:5.0%} | {v['top10_changed']:6.0%} | {v['lists']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="base,large,v2-m3")
    parser.add_argument("--lists", type=int, default=4, help="FastGPT-like lists (queries) per model")
    parser.add_argument("--docs", type=int, default=20, help="documents per list")
    parser.add_argument("--budget", type=int, default=2048, help="padded tokens per pass")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--out", help="JSON file (default bench/results/cpu-fidelity-<date>.json)")
    args = parser.parse_args(argv)
    import torch

    results = {}
    for arch in args.archs.split(","):
        print(f"{arch} …", flush=True)
        results[arch] = measure(arch, args.lists, args.docs, args.budget, args.seed)
    text = table(results)
    print(text)
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
           "args": vars(args), "results": results, "table": text}
    out = Path(args.out) if args.out else RESULTS / f"cpu-fidelity-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
