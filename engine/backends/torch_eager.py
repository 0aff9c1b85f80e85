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
from typing import Any

import numpy as np
import torch

from engine.backends import OutOfMemory, PaddedBatch
from engine.backends.cpu_dtype import bf16_matmuls, resolve_dtype

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchBackend:
    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, pad_id: int,
                 source: str = "", dtype_reason: str = "") -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.source = source
        self.dtype_reason = dtype_reason

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
                   dtype_reason=choice.reason)

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "dtype_reason": self.dtype_reason, "backend": "torch eager"}

    def warm_up(self, max_batch_tokens: int) -> None:
        pass  # nothing to capture; the capacity passes of the engine warm the allocator

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
            return self.model(input_ids=ids, attention_mask=mask).logits
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
