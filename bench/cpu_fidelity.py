"""What bf16 costs in fidelity on a CPU: bf16 scores against the float32 reference, same inputs.

    python -m bench.cpu_fidelity                       # base, large, v2-m3 (about 10 min on 2 cores)
    python -m bench.cpu_fidelity --archs small --lists 4 --docs 20

Random-weight models of the bge configs (rerank/random_model.py; a 4k vocabulary instead of 250k:
the embedding table's size changes no arithmetic) score FastGPT-like lists (bench.run's
workload: queries of 8-32 tokens, documents of 30-400). The encoder (`model.roberta`) runs each
list three ways: float32 (the reference), bf16 matrix multiplications with everything else
float32 (what torch runs for `DTYPE=auto` on a CPU with bf16 units: engine/backends/cpu_dtype.py),
the whole model cast to bf16, and, where openvino is installed, OpenVINO's bf16 encoder
(engine/backends/openvino_cpu.py, what `CPU_BACKEND=auto` runs on an AMX CPU; its features go
through the float32 head, as in the backend); the whole-bf16 features also go through a float32
head. `padding_drift` also reports how far a pair's logit moves with the batch it shares (alone
against padded among the others). Random weights
give logits packed near zero, so the same is repeated with the head scaled so that the reference
logits of the load spread over [-8, 8], as a real checkpoint's do.

Printed per model and head: the largest and the mean absolute difference of the logit and of the
score (sigmoid), the bf16 error relative to the spread of the reference logits (the standard
deviation of the differences over that of the reference logits: what decides how often neighbours
swap), the share of lists whose top 5 / top 10 (as ordered) differ from the reference's, whose top
10 holds other documents, and how many places a reference top-10 document moves on average.
JSON under bench/results/.
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

from bench.report import RESULTS
from bench.stack import CACHE

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

    from bench.workloads import make_workloads

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
            batch = PaddedBatch.of([seqs[i].tolist() for i in idx], pad_id=int(model.pad_id if hasattr(model, "pad_id")
                                                                              else model.config.pad_token_id))
            if hasattr(model, "request"):  # OpenVINO's encoder (engine/backends/openvino_cpu.py)
                hidden = torch.from_numpy(model.request.infer(model.prepare(batch))[0].copy())
            else:
                hidden = model.roberta(input_ids=torch.from_numpy(batch.ids),
                                       attention_mask=torch.from_numpy(batch.mask()))[0][:, :1]
            for row, i in enumerate(idx):
                out[i] = hidden[row : row + 1]
    return torch.cat(out)


def head_logits(head, feats) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return head(feats.to(next(head.parameters()).dtype)).float().view(-1).numpy().astype(np.float64)


def spread(reference: np.ndarray) -> tuple[float, float]:
    """(a, mid) such that `a * (logit - mid)` spans [-8, 8] on the reference logits."""
    lo, hi = float(reference.min()), float(reference.max())
    return 2 * SPREAD / max(hi - lo, 1e-9), (hi + lo) / 2


def scaled(head, a: float, mid: float):
    """A copy of the head whose logits are `a * (logit - mid)`: its last projection scaled."""
    import torch

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

    def set_changed(k: int) -> float:
        return float(np.mean([set(np.argsort(-r, kind="stable")[:k]) != set(np.argsort(-o, kind="stable")[:k])
                              for r, o in zip(reference, other)]))

    def shift(k: int) -> float:
        """Mean places a document of the reference's top k moves (ranks in the other scoring)."""
        moves = []
        for r, o in zip(reference, other):
            rank = np.empty(len(o), dtype=int)
            rank[np.argsort(-o, kind="stable")] = np.arange(len(o))
            moves += [abs(int(rank[doc]) - place) for place, doc in enumerate(np.argsort(-r, kind="stable")[:k])]
        return float(np.mean(moves))

    d = np.abs(ref - oth)
    s = np.abs(sig(ref) - sig(oth))
    return {"logit_max_diff": float(d.max()), "logit_mean_diff": float(d.mean()),
            "score_max_diff": float(s.max()), "score_mean_diff": float(s.mean()),
            "error_over_spread": float(np.std(ref - oth) / max(np.std(ref), 1e-12)),
            "reference_logits": [float(ref.min()), float(ref.max())],
            "top5_changed": changed(5), "top10_changed": changed(10), "top10_set_changed": set_changed(10),
            "top10_mean_shift": shift(10), "lists": len(reference),
            "pairs": int(ref.size)}


def measure(arch: str, lists: int, docs: int, budget: int, seed: int) -> dict[str, dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.backends.cpu_dtype import bf16_matmuls
    from engine.encoding import Encoder

    path = fidelity_model(arch)
    work = lists_for(path, lists, docs, seed)
    encoder = Encoder.load(str(path), 512)
    encoded = [encoder.encode(q, d) for q, d in work]

    def load(dtype, matmuls=False):
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
        if matmuls:
            bf16_matmuls(model)
        return model

    models = {"float32": load(torch.float32), "bf16_whole_model": load(torch.bfloat16),
              "bf16_matmuls": load(torch.float32, matmuls=True)}
    openvino = openvino_backend(path)
    if openvino is not None:
        models["openvino_bf16"] = openvino
    feats: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for name, model in models.items():
        started = time.perf_counter()
        feats[name] = [features(model, e, budget) for e in encoded]
        seconds[name] = time.perf_counter() - started
    ref_head = models["float32"].classifier
    # variant: (features of, head)
    variants = {"bf16_matmuls (auto)": ("bf16_matmuls", models["bf16_matmuls"].classifier),
                "bf16_whole_model": ("bf16_whole_model", models["bf16_whole_model"].classifier),
                "bf16_whole+f32_head": ("bf16_whole_model", ref_head)}
    if openvino is not None:
        variants["openvino_bf16"] = ("openvino_bf16", ref_head)  # the backend's head is the float32 one
    ref = [head_logits(ref_head, f) for f in feats["float32"]]
    a, mid = spread(np.concatenate(ref))
    big = [head_logits(scaled(ref_head, a, mid), f) for f in feats["float32"]]
    out: dict[str, dict] = {"seconds": seconds, "random_head": {}, "spread_head": {}}
    for variant, (source, head) in variants.items():
        out["random_head"][variant] = compare(ref, [head_logits(head, f) for f in feats[source]])
        # scaled in float32, then stored as the variant stores it (a bf16 head: rounded once)
        big_head = scaled(copy.deepcopy(head).float(), a, mid).to(next(head.parameters()).dtype) \
            if variant == "bf16_whole_model" else scaled(head, a, mid)
        out["spread_head"][variant] = compare(big, [head_logits(big_head, f) for f in feats[source]])
    out["padding_drift"] = padding_drift({k: v for k, v in models.items() if k != "bf16_whole_model"}, encoded[0],
                                         budget)
    return out


def openvino_backend(path: Path):
    """OpenVINO's bf16 encoder as the engine loads it, or None where openvino is not installed."""
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("openvino") is None:
        return None
    from engine.backends.openvino_cpu import OpenVinoBackend

    return OpenVinoBackend.load(SimpleNamespace(source=str(path), device="cpu", dtype="bfloat16", family=None,
                                                torch_threads=None))


def padding_drift(models: dict, encoded, budget: int) -> dict[str, float]:
    """Largest logit change of a pair scored alone against the same pair padded in its batch (every
    third pair of one list): how much a score moves with the traffic it shares a batch with."""
    import torch

    ends = np.cumsum(encoded.lengths)
    seqs = [encoded.ids[e - n : e] for e, n in zip(ends, encoded.lengths)]
    out = {}
    for name, model in models.items():
        head = model.head if hasattr(model, "head") else model.classifier
        in_batch = head_logits(head, features(model, encoded, budget))
        alone = [head_logits(head, features(model, type(encoded).from_sequences([seqs[i].tolist()]), budget))[0]
                 for i in range(0, len(seqs), 3)]
        out[name] = float(np.max(np.abs(np.asarray(alone) - in_batch[::3])))
    return out


def speed(arch: str, rows: int = 4, width: int = 256, reps: int = 3) -> dict[str, float]:
    """CPU seconds of one pass per variant at one torch thread (min of `reps`, taken in turns):
    CPU time, unlike wall time, barely moves when other work shares the cores."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.backends.cpu_dtype import bf16_matmuls

    path = fidelity_model(arch)
    models = {"float32": AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval(),
              "bf16_whole_model": AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).eval()}
    models["bf16_matmuls"] = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    bf16_matmuls(models["bf16_matmuls"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    openvino = openvino_backend(path)  # at one thread, like the others
    if openvino is not None:
        models["openvino_bf16"] = lambda input_ids, attention_mask: openvino.finish(openvino.launch(
            {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}))
    ids = torch.randint(5, 4000, (rows, width))
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for model in models.values():
                model(input_ids=ids, attention_mask=mask)
            for _ in range(reps):
                for name, model in models.items():
                    started = time.process_time()  # OpenVINO computes on threads of its own
                    model(input_ids=ids, attention_mask=mask)
                    times[name].append(time.process_time() - started)
    finally:
        torch.set_num_threads(threads)
    return {name: min(t) for name, t in times.items()}


def budgets(arch: str, widths=(128, 256), sizes=(1024, 2048, 4096, 8192), reps: int = 3) -> dict[str, dict]:
    """Tokens per CPU-second of the bf16 paths at one thread (torch's bf16 matmuls, and OpenVINO's
    where installed), by batch budget (rows x width): what MAX_BATCH_TOKENS on a CPU rests on."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.backends.cpu_dtype import bf16_matmuls

    model = AutoModelForSequenceClassification.from_pretrained(fidelity_model(arch), dtype=torch.float32).eval()
    bf16_matmuls(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {"torch_bf16_matmuls": lambda ids, mask: model(input_ids=ids, attention_mask=mask)}
    openvino = openvino_backend(fidelity_model(arch))  # at one thread, like torch
    if openvino is not None:
        runs["openvino_bf16"] = lambda ids, mask: openvino.finish(openvino.launch(
            {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}))
    out: dict[str, dict] = {name: {} for name in runs}
    try:
        with torch.inference_mode():
            for width in widths:
                for budget in sizes:
                    ids = torch.randint(5, 4000, (budget // width, width))
                    mask = torch.ones_like(ids)
                    for name, run in runs.items():
                        run(ids, mask)
                        took = []
                        for _ in range(reps):
                            started = time.process_time()  # OpenVINO computes on threads of its own
                            run(ids, mask)
                            took.append(time.process_time() - started)
                        out[name][f"{width}x{budget}"] = ids.numel() / min(took)
                        print(f"  {name}, width {width}, budget {budget}: {out[name][f'{width}x{budget}']:.0f} "
                              "tokens per CPU-second", flush=True)
    finally:
        torch.set_num_threads(threads)
    return out


def table(results: dict[str, dict]) -> str:
    rows = ["model  | head                | variant             | logit max / mean | score max / mean  "
            "| err/spread | top-5 | top-10 | top-10 set | shift | lists",
            "-------+---------------------+---------------------+------------------+-------------------"
            "+------------+-------+--------+------------+-------+------"]
    for arch, r in results.items():
        for head, label in (("random_head", "random weights"), ("spread_head", f"scaled to ±{SPREAD:g}")):
            for variant, v in r[head].items():
                rows.append(f"{arch:6} | {label:19} | {variant:19} | {v['logit_max_diff']:.4f} / {v['logit_mean_diff']:.4f}"
                            f"  | {v['score_max_diff']:.5f} / {v['score_mean_diff']:.5f} | {v['error_over_spread']:10.4f}"
                            f" | {v['top5_changed']:5.0%} | {v['top10_changed']:6.0%} | {v['top10_set_changed']:10.0%}"
                            f" | {v['top10_mean_shift']:5.2f} | {v['lists']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="base,large,v2-m3")
    parser.add_argument("--lists", type=int, default=3, help="FastGPT-like lists (queries) per model")
    parser.add_argument("--docs", type=int, default=20, help="documents per list")
    parser.add_argument("--budget", type=int, default=2048, help="padded tokens per pass")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--speed", action="store_true", help="also time one pass per variant (CPU seconds)")
    parser.add_argument("--speed-only", action="store_true", help="only time one pass per variant")
    parser.add_argument("--budgets", action="store_true", help="bf16 tokens per CPU-second by batch budget")
    parser.add_argument("--out", help="JSON file (default bench/results/cpu-fidelity-<date>.json)")
    args = parser.parse_args(argv)
    import torch

    results = {}
    for arch in args.archs.split(","):
        print(f"{arch} …", flush=True)
        results[arch] = {} if args.speed_only else measure(arch, args.lists, args.docs, args.budget, args.seed)
        if args.speed or args.speed_only:
            results[arch]["cpu_seconds_per_pass"] = speed(arch)
        if args.budgets:
            results[arch]["bf16_tokens_per_cpu_second_by_budget"] = budgets(arch)
    text = table({a: r for a, r in results.items() if "random_head" in r})
    for arch, r in results.items():
        if "padding_drift" in r:
            text += f"\n{arch}: largest logit change alone vs padded in its batch: " + ", ".join(
                f"{name} {d:.4f}" for name, d in r["padding_drift"].items())
    for arch, r in results.items():
        if "cpu_seconds_per_pass" in r:
            base = r["cpu_seconds_per_pass"]["float32"]
            text += f"\n{arch}: CPU seconds per pass of 4 x 256 tokens at one thread: " + ", ".join(
                f"{name} {sec:.2f} ({base / sec:.2f} x)" for name, sec in r["cpu_seconds_per_pass"].items())
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
