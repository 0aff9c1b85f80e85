"""A cross-encoder's encoder run by OpenVINO on a CPU (`CPU_BACKEND`), its head by torch.

Why: on a CPU with AMX, OpenVINO's CPU plugin runs the whole encoder in bf16 tiles (attention
included, fused), where torch runs bf16 only inside each linear layer. On the base architecture
the service answered a 100-document call in 0.25 x float32's time (torch's bf16 path: 0.41 x)
and did 1.6 x torch's bf16 pairs a second under load, at the same error against float32 and no
more dependence on what shares a batch (docs/cpu.md, "The backend: OpenVINO on a CPU with AMX").
`CPU_BACKEND=auto` therefore takes it for bf16 on an AMX CPU (engine.backends.cpu_choice).

What runs where: the family loads the float32 module as for torch (engine/families/); the encoder
(`model.base_model`) is converted to an OpenVINO model once at start-up (`openvino.convert_model`,
dynamic batch and width) and compiled with the precision `DTYPE` resolves to (bf16 where the CPU
has bf16 matrix units, as for torch; f32 for `DTYPE=float32`). Its output is only each row's
first token, which the classification head reads; the head (dense, tanh, projection) stays a
float32 torch module: run in bf16 it doubled the error (docs/cpu.md). Only cross-encoders whose
head reads the first token (XLM-RoBERTa: every bge-reranker) are served this way; for anything
else `load` says why and the engine runs torch.

OpenVINO keeps one compiled kernel set per input shape (`CPU_RUNTIME_CACHE_CAPACITY`, 5 000 by
default); the engine's batches take hundreds of shapes, so the cache is bounded like oneDNN's
(engine.runtime.bound_kernel_caches).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from engine.backends import OutOfMemory, PaddedBatch
from engine.backends.cpu_dtype import cpu_bf16_units, resolve_dtype

log = logging.getLogger(__name__)

#: Compiled shapes OpenVINO's CPU plugin keeps (its default: 5 000); see the module docstring.
RUNTIME_CACHE = 64


def without_telemetry() -> None:
    """Work-around: OpenVINO's model converter (`openvino.convert_model`) sends usage events to
    Google Analytics unless a consent file in the user's home says no: opt-out since
    openvinotoolkit/openvino#20290, whatever openvino-telemetry's own page says
    (openvinotoolkit/openvino#34588). A rerank server must not phone home. With
    `openvino_telemetry` made unimportable the converter falls back to its own stub
    (openvino/tools/ovc/telemetry_utils.py: `except ImportError: import telemetry_stub`)."""
    sys.modules["openvino_telemetry"] = None


class Unsupported(Exception):
    """This model cannot run on the OpenVINO backend; the reason says why (torch runs it)."""


class _FirstToken(torch.nn.Module):
    """The encoder's last hidden state at the first token: what the head reads."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0][:, :1]


class OpenVinoBackend:
    def __init__(self, request, head: torch.nn.Module, *, pad_id: int, precision: str, dtype_reason: str,
                 threads: int, converted_s: float, source: str = "") -> None:
        self.request = request
        self.head = head
        self.pad_id = pad_id
        self.precision = precision
        self.dtype_reason = dtype_reason
        self.threads = threads
        self.converted_s = converted_s
        self.source = source
        self.backend_reason: str | None = None  # why OpenVINO runs (engine.backends.cpu_choice)

    @classmethod
    def load(cls, config) -> OpenVinoBackend:
        """Raises `Unsupported` (openvino missing, not a first-token cross-encoder). The caller
        (engine.backends.load_backend) has made sure the device is a CPU."""
        from engine.families import family_of

        family = family_of(config.source, getattr(config, "family", None))
        if family.NAME != "cross-encoder":
            raise Unsupported(f"the openvino backend serves cross-encoders, not the {family.NAME} family")
        without_telemetry()
        try:
            import openvino
        except ImportError as exc:
            raise Unsupported(f"openvino is not installed ({exc}): pip install openvino, as requirements/worker.txt pins it") from None
        choice = resolve_dtype(family.dtype(config.dtype, "cpu"), torch.device("cpu"))
        if choice.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"the openvino backend runs bf16 or float32, not {choice.dtype}")
        model, pad_id = family.load_model(config.source, torch.float32)
        model.eval()
        encoder, head = getattr(model, "base_model", None), getattr(model, "classifier", None)
        if model.config.model_type not in ("xlm-roberta", "roberta") or encoder is None or head is None:
            raise Unsupported(f"the openvino backend serves XLM-RoBERTa cross-encoders, not {model.config.model_type}")
        started = time.perf_counter()
        example = {"input_ids": torch.full((2, 16), 5, dtype=torch.int64),
                   "attention_mask": torch.ones(2, 16, dtype=torch.int64)}
        with torch.inference_mode():
            converted = openvino.convert_model(_FirstToken(encoder).eval(), example_input=example)
        precision = "bf16" if choice.dtype is torch.bfloat16 else "f32"
        threads = config.torch_threads or torch.get_num_threads()
        compiled = openvino.Core().compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,  # the batcher runs one batch at a time
            "INFERENCE_NUM_THREADS": threads,
            # The engine shares the box with its feeders and the API: no thread pinned to a core.
            "ENABLE_CPU_PINNING": False,
            "CPU_RUNTIME_CACHE_CAPACITY": int(os.environ.get("CPU_RUNTIME_CACHE_CAPACITY", RUNTIME_CACHE)),
        })
        converted_s = time.perf_counter() - started
        del converted  # the compiled model holds what it needs
        log.info("openvino %s: encoder converted and compiled in %.1f s (%s threads), head in torch float32",
                 openvino.__version__, converted_s, threads)
        head.float()
        if config.dtype == "auto" and precision == "bf16":
            reason = (f"auto: the CPU multiplies bf16 natively ({', '.join(cpu_bf16_units())}): OpenVINO runs the "
                      "encoder at bf16 inference precision, the head float32; DTYPE=float32 for the reference path")
        elif config.dtype == "auto":
            reason = "auto: the CPU has no native bf16 matrix support: OpenVINO runs the encoder in float32"
        else:
            reason = f"DTYPE={config.dtype}: OpenVINO runs the encoder at {precision} inference precision, the head float32"
        return cls(compiled.create_infer_request(), head, pad_id=pad_id, precision=precision, dtype_reason=reason,
                   threads=threads, converted_s=converted_s, source=config.source)

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "dtype": "bfloat16" if self.precision == "bf16" else "float32",
                "dtype_reason": self.dtype_reason, "backend": f"openvino ({self.precision}), head torch float32",
                "backend_reason": self.backend_reason, "openvino_threads": self.threads,
                "openvino_compile_s": round(self.converted_s, 1)}

    def warm_up(self, max_batch_tokens: int) -> None:
        """Nothing: the engine's capacity passes compile the first shapes."""

    def prepare(self, batch: PaddedBatch) -> dict[str, np.ndarray]:
        return {"input_ids": batch.ids, "attention_mask": batch.mask()}

    def launch(self, prepared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Starts the pass on OpenVINO's threads and returns: the batcher collates the next batch
        meanwhile (`prepared` stays referenced until `finish`)."""
        self.request.start_async(prepared)
        return prepared

    @torch.inference_mode()
    def finish(self, handle: dict[str, np.ndarray]) -> np.ndarray:
        try:
            self.request.wait()
        except RuntimeError as exc:  # an allocation that failed: the batcher splits the batch
            if "bad_alloc" in str(exc) or "allocate" in str(exc):
                raise OutOfMemory(str(exc)) from None
            raise
        first = torch.from_numpy(np.array(self.request.get_output_tensor(0).data, dtype=np.float32))
        return self.head(first).view(-1).float().numpy()
