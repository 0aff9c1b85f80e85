"""A simulated H100 (`DEVICE=sim`): see the GPU path's behaviour on a CPU-only machine.

On the GPU the service is bound by Python launching kernels with the GIL held, not by the device
(docs/gpu.md#measured-on-an-h100). This backend reproduces exactly that, from the forward-pass timings measured
on an H100 (`h100_forward_timing.json`: torch 2.11, fp16, median of 5 passes per shape; `launch_ms`
until the forward call returned, `total_ms` until the logits were on the CPU):
for each batch it holds the GIL for the launch time (a busy Python loop, as the model's Python
code does), then sleeps, GIL released, for the rest of the pass. Times are interpolated by shape
(rows x width, log-log) within the measured grid and scaled by cost beyond it. With CUDA graphs
on, a batch that fits a bucket (buckets.py, padded as the real backend pads it) launches in
0.2 ms and takes the device time of its padded shape.

Qwen3-Reranker's shapes (`qwen3-0.6b`, `qwen3-4b`, `qwen3-8b`) were never measured; their tables
are derived from the measured `v2-m3` one (XLM-R large, widths to 8192), shape by shape (`derive`):
the device time scales by the ratio of forward FLOPs per token at that width (2 x the layer
weights, plus attention's 4 x width x attention dim per layer, halved for a causal model), and the
Python launch time by the ratio of kernel launches (layers x kernels per layer: a Qwen3 decoder
layer launches about twice an XLM-R layer's kernels in eager transformers, with its RMSNorms,
q/k norms, rotary embedding and gated MLP; an estimate, to be replaced by measurements).

Everything else is real: the real tokenizer, batcher, process, Celery and API. The scores are
deterministic placeholders computed from the token ids, never fit for correctness; the worker
logs and /v1/models say so (`simulated: true`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import PaddedBatch
from engine.backends.buckets import Buckets, pad_to

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("h100_forward_timing.json")
#: Launch time of a replayed graph (docs/gpu.md#cuda-graphs-on-the-h100: 0.8 ms for a whole 1 x 64 base pass).
GRAPH_LAUNCH_MS = 0.2
#: The shortest replayed pass, end to end, by profile (docs/gpu.md#cuda-graphs-on-the-h100, 1 x 64: base 0.79, large 1.58 ms).
GRAPH_FLOOR_MS = {"base": 0.76, "large": 1.5, "v2-m3": 1.5}
#: Which profile a model config is, by (hidden size, layers, position table).
PROFILES = {(768, 12, 514): "base", (1024, 24, 514): "large", (1024, 24, 8194): "v2-m3",
            (1024, 28, 40960): "qwen3-0.6b", (2560, 36, 40960): "qwen3-4b", (4096, 36, 40960): "qwen3-8b"}

#: Shapes of the measured table the others are derived from, and of the derived profiles
#: (config.json values; `gated`: a SwiGLU MLP of three matrices; `kernels`: launches per layer
#: relative to an XLM-R layer).
MEASURED_SHAPE = dict(hidden=1024, layers=24, heads=16, kv_heads=16, head_dim=64, intermediate=4096,
                      gated=False, causal=False, kernels=1.0)
DERIVED = {
    "qwen3-0.6b": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                       gated=True, causal=True, kernels=2.0),
    "qwen3-4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                     gated=True, causal=True, kernels=2.0),
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288,
                     gated=True, causal=True, kernels=2.0),
}


def layer_weights(shape: dict) -> int:
    """Weights of one layer's matrices (embeddings and norms left out)."""
    h, q, kv = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    mlp = (3 if shape["gated"] else 2) * h * shape["intermediate"]
    return h * q + 2 * h * kv + q * h + mlp


def flops_per_token(shape: dict, width: int) -> float:
    """Forward FLOPs per token of a `width`-token pair: 2 per weight, plus attention's scores and
    weighted sum (2 x 2 x width x attention dim per layer; half of it under a causal mask)."""
    attention = 4 * width * shape["heads"] * shape["head_dim"] * (0.5 if shape["causal"] else 1.0)
    return shape["layers"] * (2 * layer_weights(shape) + attention)


def derive(rows: list[dict], shape: dict, base: dict = MEASURED_SHAPE) -> list[dict]:
    """A timing table for `shape` from one measured for `base` (module docstring): launch time
    scaled by kernel launches, device time by FLOPs, and the pass takes the longer of the two."""
    launches = shape["layers"] * shape["kernels"] / (base["layers"] * base["kernels"])
    out = []
    for r in rows:
        device = max(r["total_ms"] - r["launch_ms"], 0.0)  # what the device adds after the launch
        if r["total_ms"] > 1.5 * r["launch_ms"]:  # device-bound: the whole pass is device time
            device = r["total_ms"]
        ratio = flops_per_token(shape, r["width"]) / flops_per_token(base, r["width"])
        launch = r["launch_ms"] * launches
        out.append(dict(rows=r["rows"], width=r["width"], launch_ms=round(launch, 3),
                        total_ms=round(max(launch + (r["total_ms"] - r["launch_ms"]), device * ratio), 3)))
    return out


def _cost(rows: float, width: float) -> float:
    return rows * width * max(1.0, width / 512)


class Timing:
    """Launch and total milliseconds of an eager pass by shape, and device time of a replay."""

    def __init__(self, rows: list[dict], profile: str) -> None:
        self.profile = profile
        self.rows_grid = sorted({r["rows"] for r in rows})
        self.width_grid = sorted({r["width"] for r in rows})
        self.launch = {(r["rows"], r["width"]): r["launch_ms"] for r in rows}
        self.total = {(r["rows"], r["width"]): r["total_ms"] for r in rows}
        # The table stops near 131 072 padded tokens: fill the grid's far corner from the largest
        # measured row count of the same width (same launch, time scaled by cost: GPU-bound there).
        for w in self.width_grid:
            for r in self.rows_grid:
                if (r, w) not in self.total:
                    known = max(k for k in self.rows_grid if (k, w) in self.total and k < r)
                    self.launch[(r, w)] = self.launch[(known, w)]
                    self.total[(r, w)] = self.total[(known, w)] * _cost(r, w) / _cost(known, w)
        bound = [r["total_ms"] / _cost(r["rows"], r["width"]) for r in rows
                 if r["total_ms"] > 1.5 * r["launch_ms"] and r["width"] <= 512]
        self.ms_per_cost = float(np.median(bound))  # the device's own pace, where it is the bottleneck
        if profile in DERIVED:  # a graph's floor is its kernels' launches on the device
            shape = DERIVED[profile]
            self.graph_floor_ms = GRAPH_FLOOR_MS["v2-m3"] * shape["layers"] * shape["kernels"] / MEASURED_SHAPE["layers"]
        else:
            self.graph_floor_ms = GRAPH_FLOOR_MS[profile]

    @classmethod
    def load(cls, profile: str) -> Timing:
        archs = json.loads(TABLE.read_text())["archs"]
        if profile in DERIVED:
            return cls(derive(archs["v2-m3"], DERIVED[profile]), profile)
        if profile not in archs:
            raise ValueError(f"SIM_PROFILE must be one of {sorted([*archs, *DERIVED])}, not {profile!r}")
        return cls(archs[profile], profile)

    def _interp(self, table: dict, rows: int, width: int) -> float:
        """Bilinear in (log rows, log width), clamped to the grid, scaled by cost beyond it."""
        r = min(max(rows, self.rows_grid[0]), self.rows_grid[-1])
        w = min(max(width, self.width_grid[0]), self.width_grid[-1])
        r0, r1 = _bracket(self.rows_grid, r)
        w0, w1 = _bracket(self.width_grid, w)
        fr = 0.0 if r0 == r1 else (math.log(r) - math.log(r0)) / (math.log(r1) - math.log(r0))
        fw = 0.0 if w0 == w1 else (math.log(w) - math.log(w0)) / (math.log(w1) - math.log(w0))
        # Bilinear in log time too (a power law between grid points): interpolating the time itself
        # on log axes bowed it upwards between rows 64 and 256, so 128 rows cost 0.64 us a token
        # against 0.51 at 64 and 256, a shape no device has (and a batcher tuned on it would chase).
        log_value = ((1 - fr) * (1 - fw) * math.log(table[(r0, w0)]) + fr * (1 - fw) * math.log(table[(r1, w0)])
                     + (1 - fr) * fw * math.log(table[(r0, w1)]) + fr * fw * math.log(table[(r1, w1)]))
        return math.exp(log_value) * max(1.0, _cost(rows, width) / _cost(r, w))

    def eager(self, rows: int, width: int) -> tuple[float, float]:
        """(launch, total) seconds of an eager pass."""
        launch = self._interp(self.launch, min(rows, self.rows_grid[-1]), min(width, self.width_grid[-1]))
        total = max(self._interp(self.total, rows, width), launch)
        return launch / 1000, total / 1000

    def graph(self, rows: int, width: int) -> tuple[float, float]:
        """(launch, total) seconds of a replayed graph of this (padded) shape."""
        device = self.graph_floor_ms + self.ms_per_cost * _cost(rows, width)
        return GRAPH_LAUNCH_MS / 1000, max(device, GRAPH_LAUNCH_MS) / 1000


def _bracket(grid: list[int], x: float) -> tuple[int, int]:
    for lo, hi in zip(grid, grid[1:]):
        if lo <= x <= hi:
            return lo, hi
    return grid[-1], grid[-1]


def profile_of(config) -> str | None:
    """The profile whose architecture matches a transformers config, if any."""
    key = (int(config.hidden_size), int(config.num_hidden_layers), int(config.max_position_embeddings))
    return PROFILES.get(key)


class SimBackend:
    def __init__(self, timing: Timing, *, pad_id: int, buckets: Buckets | None) -> None:
        self.timing = timing
        self.pad_id = pad_id
        self.buckets = buckets

    @classmethod
    def load(cls, config) -> SimBackend:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(config.source)
        profile = config.sim_profile or profile_of(model_config)
        if profile is None:
            raise ValueError(f"{config.source} is none of the bge-reranker architectures: name the timing "
                             f"table to simulate with SIM_PROFILE=base|large|v2-m3|qwen3-0.6b|qwen3-4b|qwen3-8b")
        buckets = Buckets(config.graph_max_tokens, config.max_length) if config.cuda_graphs else None
        log.warning("DEVICE=sim: a simulated H100 (%s timings%s); scores are placeholders, not the model's",
                    profile, ", CUDA graphs" if buckets else "")
        return cls(Timing.load(profile), pad_id=int(model_config.pad_token_id or 1), buckets=buckets)

    def describe(self) -> dict[str, Any]:
        return {"device": "sim", "dtype": "bfloat16" if self.timing.profile in DERIVED else "float16", "simulated": True,
                "backend": f"simulated H100 ({self.timing.profile}"
                           f"{', CUDA graphs' if self.buckets else ', eager'}); placeholder scores",
                "cuda_graphs": len(self.buckets.shapes()) if self.buckets else 0}

    def warm_up(self, max_batch_tokens: int) -> None:
        pass

    def prepare(self, batch: PaddedBatch) -> Any:
        bucket = self.buckets.fit(batch.rows, batch.width) if self.buckets else None
        if bucket is not None:
            padded = pad_to(batch, *bucket, self.pad_id)
            times = self.timing.graph(*bucket)
        else:
            padded = batch
            times = self.timing.eager(batch.rows, batch.width)
        return batch, padded.mask(), times

    def launch(self, prepared: Any) -> Any:
        batch, mask, (launch, total) = prepared
        started = time.perf_counter()
        # Placeholders: a fixed function of the tokens, so equal pairs score equally anywhere.
        logits = ((batch.ids * mask[: batch.rows, : batch.width]) % 1009).sum(axis=1) % 1000 / 100.0 - 5.0
        end = started + launch
        while time.perf_counter() < end:  # Python launching kernels: the GIL is held, as there
            pass
        return started + total, logits.astype(np.float32)

    def finish(self, handle: Any) -> np.ndarray:
        ready_at, logits = handle
        left = ready_at - time.perf_counter()
        if left > 0:
            time.sleep(left)  # the device works; the GIL is free
        return logits
