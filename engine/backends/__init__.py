"""Backends: one padded batch in, one logit per row out. The seam between batching and devices.

A backend is driven in three steps, so the batcher can choose and collate the next batch while
the device works on this one:

    prepare(PaddedBatch) -> prepared    host-side work: tensors, pinned memory, a graph bucket
    launch(prepared)     -> handle      start the forward pass (on CUDA it returns before the
                                        device is done)
    finish(handle)       -> logits      wait for the device; float32 numpy array, one per row

and raises `OutOfMemory` (its own error type) when a batch does not fit, so the batcher can split
it. Implementations: `torch_eager` (CPU and CUDA), `cuda_graphs` (captured graphs replayed for a
fixed set of shapes, eager otherwise) and `sim` (a simulated H100 for CPU-only machines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.errors import OutOfMemory  # noqa: F401  (re-exported: backends raise it)


@dataclass
class PaddedBatch:
    """Token ids right-padded to the longest row (`ids[r, :lengths[r]]` is row r's input)."""

    ids: np.ndarray  # int64, rows x width
    lengths: np.ndarray  # int32, rows

    @classmethod
    def of(cls, sequences, pad_id: int) -> PaddedBatch:
        """Token id lists, right-padded (tests, benchmarks, the seed-style baseline)."""
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
        return cls(ids=ids, lengths=np.asarray([len(s) for s in sequences], dtype=np.int32))

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def mask(self) -> np.ndarray:
        return (np.arange(self.width)[None, :] < self.lengths[:, None]).astype(np.int64)


class Backend(Protocol):
    pad_id: int

    def prepare(self, batch: PaddedBatch) -> Any: ...

    def launch(self, prepared: Any) -> Any: ...

    def finish(self, handle: Any) -> np.ndarray: ...

    def warm_up(self, max_batch_tokens: int) -> None:
        """Whatever makes the first real batch as fast as the rest (graph capture, allocator)."""

    def describe(self) -> dict[str, Any]:
        """Device, dtype and what the backend does, for logs, heartbeats and /v1/models."""


def default_batch_tokens(device_type: str) -> int:
    """Padded tokens per forward pass: big enough to fill a GPU; on CPU, small batches stay in
    cache and run faster (2048 beat 8192 by 20-25 % for base and small models on 2 cores)."""
    return 2048 if device_type == "cpu" else 65536


def forward(backend: Backend, batch: PaddedBatch) -> np.ndarray:
    """One batch start to end (warm-up, tests, the model-alone benchmark)."""
    return backend.finish(backend.launch(backend.prepare(batch)))


def load_backend(config) -> Backend:
    """The backend an EngineConfig asks for: `sim`, or torch on `auto`/`cpu`/`cuda[:N]`, with
    CUDA graphs on CUDA unless `cuda_graphs` is off."""
    if config.device == "sim":
        from engine.backends.sim import SimBackend

        return SimBackend.load(config)
    from engine.backends.torch_eager import TorchBackend

    eager = TorchBackend.load(config)
    if eager.device.type == "cuda" and config.cuda_graphs:
        from engine.backends.cuda_graphs import CudaGraphBackend

        return CudaGraphBackend(eager, max_tokens=config.graph_max_tokens)
    return eager
