"""The model as transformers loads it, run eagerly with torch on the CPU or a CUDA device.

The model family builds the module (engine/families/: `AutoModelForSequenceClassification` for
cross-encoders, as sentence-transformers loads it; a causal LM's base model and score rows for
Qwen3 and gemma), from a Hugging Face id or a local folder. The dtype is the family's request
resolved by `cpu_dtype.resolve_dtype`: fp16 on CUDA for cross-encoders (the reference's fast path),
bf16 on CUDA for causal LMs, bf16 matrix multiplications on a CPU with native bf16 matrix units,
float32 on other CPUs; logits always come back as float32.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from engine.backends import OutOfMemory, PaddedBatch
from engine.backends.cpu_dtype import bf16_matmuls, resolve_dtype

log = logging.getLogger(__name__)

#: Largest logit difference a compiled model may show against eager at warm-up (bf16 rounds
#: differently when inductor fuses: 0.004 measured on base, bench/cpu_compile.py).
COMPILE_TOLERANCE = 0.05


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchBackend:
    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, pad_id: int,
                 source: str = "", dtype_reason: str = "", compile: bool = False) -> None:
        self.model = model
        self.run_model = model  # what launch calls: the model, or its torch.compile'd form
        self.compile = compile
        self.compiled: str | None = None  # "inductor", or why it is not compiled
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.source = source
        self.dtype_reason = dtype_reason
        self.backend_reason: str | None = None  # on a CPU, why torch runs (engine.backends.cpu_choice)

    @classmethod
    def load(cls, config) -> TorchBackend:
        from engine.families import family_of

        # The family builds the module (engine/families/): its `.logits` is one score per row.
        family = family_of(config.source, getattr(config, "family", None))
        device = resolve_device(config.device)
        choice = resolve_dtype(family.dtype(config.dtype, device.type), device)
        log.info("dtype %s (%s)", str(choice.dtype).removeprefix("torch."), choice.reason)
        model, pad_id = family.load_model(config.source, choice.load_dtype)
        model.to(device).eval()
        if choice.bf16_matmuls:
            bf16_matmuls(model)
        return cls(model, device=device, dtype=choice.dtype, pad_id=pad_id, source=config.source,
                   dtype_reason=choice.reason, compile=bool(getattr(config, "torch_compile", False)))

    def describe(self) -> dict[str, Any]:
        out = {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
               "dtype_reason": self.dtype_reason,
               "backend": "torch compile (inductor)" if self.run_model is not self.model else "torch eager"}
        if self.compile:
            out["torch_compile"] = self.compiled
        if self.backend_reason:
            out["backend_reason"] = self.backend_reason
        return out

    def warm_up(self, max_batch_tokens: int) -> None:
        """Eager: nothing to capture; the capacity passes of the engine warm the allocator.
        `TORCH_COMPILE` on a CPU: compile here, for dynamic shapes (one graph for every batch shape,
        rather than a recompile on the second; one more for one-row batches), checked on those two
        shapes against eager; on any failure (no C++ compiler, an unsupported op, a difference) the
        model stays eager."""
        if not self.compile:
            return
        if self.device.type != "cpu":
            self.compiled = f"not compiled: TORCH_COMPILE applies to a CPU, not {self.device.type}"
            log.info("%s", self.compiled)
            return
        started = time.perf_counter()
        try:
            compiled = torch.compile(self.model, dynamic=True)
            rng = np.random.default_rng(0)
            for rows, width in ((1, 16), (3, 40)):  # one row: its own graph (torch specializes size 1)
                ids = rng.integers(5, 100, size=(rows, width)).astype(np.int64)
                lengths = np.array([width] + [width // 2] * (rows - 1), dtype=np.int32)
                ids_t, mask = self.prepare(PaddedBatch(ids=ids, lengths=lengths))
                with torch.inference_mode():
                    got = compiled(input_ids=ids_t, attention_mask=mask).logits.float()
                    want = self.model(input_ids=ids_t, attention_mask=mask).logits.float()
                if not torch.allclose(got, want, atol=COMPILE_TOLERANCE, rtol=0):
                    raise RuntimeError(f"compiled logits differ from eager by {float((got - want).abs().max()):.4f}")
        except Exception as exc:  # noqa: BLE001 - whatever stops compiling, eager still scores
            self.compiled = f"not compiled ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}): eager"
            log.warning("TORCH_COMPILE: %s", self.compiled)
            return
        self.run_model = compiled
        self.compiled = f"inductor, dynamic shapes, compiled in {time.perf_counter() - started:.0f} s"
        log.info("TORCH_COMPILE: %s", self.compiled)

    def prepare(self, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask on the CPU (pinned for a fast copy to CUDA)."""
        ids = torch.from_numpy(batch.ids)
        mask = torch.from_numpy(batch.mask())
        if self.device.type == "cuda":
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return ids, mask

    @torch.inference_mode()
    def launch(self, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        try:
            ids, mask = (t.to(self.device, non_blocking=True) for t in prepared)
            return self.run_model(input_ids=ids, attention_mask=mask).logits
        except RuntimeError as exc:
            raise out_of_memory(exc, self.device) from None

    def finish(self, logits: torch.Tensor) -> np.ndarray:
        try:
            return logits.view(-1).float().cpu().numpy()
        except RuntimeError as exc:
            raise out_of_memory(exc, self.device) from None


def out_of_memory(exc: RuntimeError, device: torch.device) -> Exception:
    """`OutOfMemory` for the batcher to split the batch; any other error unchanged."""
    if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
        return exc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return OutOfMemory(str(exc))
