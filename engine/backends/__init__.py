"""Backends: one padded batch in, one logit per row out. The seam between batching and devices.

A backend is driven in three steps, so the batcher can choose and collate the next batch while
the device works on this one:

    prepare(PaddedBatch) -> prepared    host-side work: tensors, pinned memory, a graph bucket
    launch(prepared)     -> handle      start the forward pass (on CUDA it returns before the
                                        device is done)
    finish(handle)       -> logits      wait for the device; float32 numpy array, one per row

and raises `OutOfMemory` (its own error type) when a batch does not fit, so the batcher can split
it. Implementations: `torch_eager` (CPU and CUDA), `cuda_graphs` (captured graphs replayed for a
fixed set of shapes, eager otherwise), `openvino_cpu` (a cross-encoder's encoder run by OpenVINO on
a CPU, `CPU_BACKEND=openvino`) and `sim` (a simulated H100 for CPU-only machines).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.errors import OutOfMemory  # noqa: F401  (re-exported: backends raise it)

log = logging.getLogger(__name__)


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
    """The backend an EngineConfig asks for: `sim`; on a CPU, OpenVINO where `cpu_backend` picks
    it (`cpu_choice`) and it can run the model (torch otherwise, saying why); torch on
    `auto`/`cpu`/`cuda[:N]`, with CUDA graphs on CUDA unless `cuda_graphs` is off."""
    if config.device == "sim":
        from engine.backends.sim import SimBackend

        return SimBackend.load(config)
    from engine.backends.torch_eager import TorchBackend, resolve_device

    if resolve_device(config.device).type == "cpu":
        name, reason = cpu_choice(config)
        if name == "openvino":
            from engine.backends.openvino_cpu import OpenVinoBackend, Unsupported

            try:
                backend = OpenVinoBackend.load(config)
                backend.backend_reason = reason
                return backend
            except Unsupported as exc:
                reason = f"torch: {exc}"
                (log.warning if config.cpu_backend == "openvino" else log.info)("CPU_BACKEND=%s: %s",
                                                                                 config.cpu_backend, reason)
        eager = TorchBackend.load(config)
        eager.backend_reason = reason
        return eager
    eager = TorchBackend.load(config)
    if eager.device.type == "cuda" and config.cuda_graphs:
        from engine.backends.cuda_graphs import CudaGraphBackend

        return CudaGraphBackend(eager, max_tokens=config.graph_max_tokens)
    return eager


def cpu_choice(config) -> tuple[str, str]:
    """`CPU_BACKEND` resolved: ("torch" | "openvino", why). `auto` takes OpenVINO where it was
    measured to win (docs/cpu.md, "The backend"): a CPU with AMX, running bf16 (`DTYPE` auto or
    bfloat16; `DTYPE=float32`, the reference path, stays torch), with openvino installed, and
    no `TORCH_COMPILE` (a torch feature). Whether the model suits it (an XLM-RoBERTa
    cross-encoder) the backend itself checks."""
    import importlib.util

    import torch

    from engine.backends.cpu_dtype import cpu_bf16_units, resolve_dtype

    asked = config.cpu_backend
    if asked != "auto":
        return asked, f"CPU_BACKEND={asked}"
    if resolve_dtype(config.dtype, torch.device("cpu")).dtype is not torch.bfloat16:
        return "torch", "CPU_BACKEND=auto: torch runs float32 (the reference path)"
    if getattr(config, "torch_compile", False):
        return "torch", "CPU_BACKEND=auto: torch, TORCH_COMPILE asks for torch.compile"
    if "amx_bf16" not in cpu_bf16_units():
        return "torch", "CPU_BACKEND=auto: torch, the CPU has no AMX (OpenVINO was measured only with AMX)"
    if importlib.util.find_spec("openvino") is None:
        return "torch", "CPU_BACKEND=auto: torch, openvino is not installed (requirements/worker.txt pins it)"
    return "openvino", "CPU_BACKEND=auto: OpenVINO, bf16 on a CPU with AMX"
