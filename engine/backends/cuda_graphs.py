"""Replay captured CUDA graphs of the forward pass instead of launching it from Python.

On an H100 an eager forward pass of up to ~16 000 tokens takes as long as Python takes to
launch its kernels: 5-10 ms for base, 9-20 ms for large, GIL held (docs/gpu.md#one-forward-pass-by-shape). A
replayed graph launches the same work in about 0.2 ms with identical scores (docs/gpu.md#cuda-graphs-on-the-h100). So each
bucket shape (buckets.py) is captured once while the worker warms up; a batch is padded up to its
bucket, copied into the graph's static inputs and replayed. Shapes outside the buckets run
eagerly. All graphs share one memory pool (they never run at the same time), so the graphs cost
little more memory than the largest bucket's activations; `describe()` states how much.

If a capture fails, or a replay disagrees with the eager pass, the backend warns and stays eager:
a worker never refuses to start because of graphs. `CUDA_GRAPHS=off` skips them altogether.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from engine.backends import PaddedBatch
from engine.backends.buckets import Buckets, pad_to
from engine.backends.torch_eager import TorchBackend, out_of_memory

log = logging.getLogger(__name__)

#: A replay must give the eager pass's logits within this (fp16 kernels may differ in the last bits).
TOLERANCE = 2e-2


class _Graph:
    __slots__ = ("graph", "ids", "mask", "out")

    def __init__(self, graph: torch.cuda.CUDAGraph, ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor):
        self.graph, self.ids, self.mask, self.out = graph, ids, mask, out


class CudaGraphBackend:
    def __init__(self, eager: TorchBackend, *, max_tokens: int, max_width: int = 512) -> None:
        self.eager = eager
        self.pad_id = eager.pad_id
        self.device = eager.device
        self.dtype = eager.dtype
        self.buckets = Buckets(max_tokens, max_width)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.memory_bytes = 0
        self.capture_seconds = 0.0
        self.failure: str | None = None

    def describe(self) -> dict[str, Any]:
        info = self.eager.describe()
        info.update(backend="torch + CUDA graphs" if self.graphs else "torch eager (CUDA graphs failed)",
                    cuda_graphs=len(self.graphs), graph_memory_mib=round(self.memory_bytes / 2**20, 1),
                    graph_max_tokens=self.buckets.max_tokens)
        if self.failure:
            info["cuda_graphs_error"] = self.failure
        return info

    # --- capture ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self, max_batch_tokens: int) -> None:
        started = time.perf_counter()
        before = self._reserved()
        try:
            torch.cuda.synchronize(self.device)
            pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            for rows, width in self.buckets.shapes():  # largest first: the pool is sized once
                self.graphs[(rows, width)] = self._capture(rows, width, pool, side)
            self._verify()
        except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed (%s); running eager forward passes", self.failure)
            self.graphs.clear()
            self._release()
        self.memory_bytes = max(self._reserved() - before, 0) if self.graphs else 0
        self.capture_seconds = time.perf_counter() - started
        if self.graphs:
            log.info("captured %d CUDA graphs (up to %d padded tokens) in %.1fs, using %.0f MiB of GPU memory",
                     len(self.graphs), self.buckets.max_tokens, self.capture_seconds, self.memory_bytes / 2**20)

    def _reserved(self) -> int:
        """GPU memory torch holds now (0 where there is no CUDA)."""
        try:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_reserved(self.device)
        except Exception:  # noqa: BLE001
            return 0

    def _release(self) -> None:
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def _capture(self, rows: int, width: int, pool, side: torch.cuda.Stream) -> _Graph:
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        mask[:, 0] = 1
        model = self.eager.model
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up passes on a side stream, as torch.cuda.graph asks
            for _ in range(2):
                model(input_ids=ids, attention_mask=mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = model(input_ids=ids, attention_mask=mask).logits
        return _Graph(graph, ids, mask, out)

    def _verify(self) -> None:
        """One padded batch through a graph and eagerly: the logits must agree."""
        rng = np.random.default_rng(0)
        width = min(60, self.buckets.widths[-1])
        lengths = rng.integers(4, width + 1, size=3).astype(np.int32)
        vocab = int(self.eager.model.config.vocab_size)
        ids = np.full((3, int(lengths.max())), self.pad_id, dtype=np.int64)
        for r, n in enumerate(lengths):
            ids[r, :n] = rng.integers(3, vocab, size=n)
        batch = PaddedBatch(ids=ids, lengths=lengths)
        eager = self.eager.finish(self.eager.launch(self.eager.prepare(batch)))
        graph = self.finish(self.launch(self.prepare(batch)))
        if not np.allclose(eager, graph, atol=TOLERANCE, rtol=TOLERANCE):
            raise RuntimeError(f"graph replay disagrees with the eager pass: {graph} != {eager}")

    # --- the three steps --------------------------------------------------------------------------------------
    def prepare(self, batch: PaddedBatch) -> Any:
        bucket = self.buckets.fit(batch.rows, batch.width) if self.graphs else None
        if bucket not in self.graphs:
            return ("eager", self.eager.prepare(batch))
        padded = pad_to(batch, *bucket, self.pad_id)
        ids = torch.from_numpy(padded.ids).pin_memory()
        mask = torch.from_numpy(padded.mask()).pin_memory()
        return ("graph", bucket, batch.rows, ids, mask)

    @torch.inference_mode()
    def launch(self, prepared: Any) -> Any:
        if prepared[0] == "eager":
            return ("eager", self.eager.launch(prepared[1]))
        _, bucket, rows, ids, mask = prepared
        graph = self.graphs[bucket]
        try:
            graph.ids.copy_(ids, non_blocking=True)
            graph.mask.copy_(mask, non_blocking=True)
            graph.graph.replay()
        except RuntimeError as exc:
            raise out_of_memory(exc, self.device) from None
        return ("graph", graph.out, rows)

    def finish(self, handle: Any) -> np.ndarray:
        if handle[0] == "eager":
            return self.eager.finish(handle[1])
        _, out, rows = handle
        try:
            return out[:rows].view(-1).float().cpu().numpy()
        except RuntimeError as exc:
            raise out_of_memory(exc, self.device) from None
