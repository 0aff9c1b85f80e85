"""Load a bge-reranker checkpoint once and run padded batches through it. Nothing else.

Loading follows transformers/sentence-transformers (`AutoTokenizer` + `AutoModelForSequenceClassification`
from a Hugging Face id or a local folder). Input layout and truncation follow FlagEmbedding's
`FlagReranker.compute_score` (CONTRACT §4), the reference the scores must match:
query cut to `max_length * 3 // 4` tokens, passage to what is left, `<s> q </s></s> p </s>`.

This module imports only torch and transformers, so scoring works without any server
(benchmarks, notebooks, the GPU script).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.batching import OutOfMemory

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the reference's fast path), float32 on CPU where half precision is slow."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class Reranker:
    """A loaded cross-encoder with the token layout of its pair inputs."""

    source: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    max_length: int
    limit: int  # the longest input the checkpoint's position table allows
    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    pad_id: int

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def encode(
        self, query: str, documents: Sequence[str], max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids of each (query, document) pair, truncated as FlagEmbedding does."""
        max_length = min(max_length or self.max_length, self.limit)
        q_ids = self.query_ids(query, max_length)
        if not documents:
            return []
        docs = self.tokenizer(list(documents), add_special_tokens=False, truncation=True, max_length=max_length)
        room = self.room(q_ids, max_length)
        head = self.prefix + q_ids + self.middle
        return [head + d[:room] + self.suffix for d in docs["input_ids"]]

    def query_ids(self, query: str, max_length: int) -> list[int]:
        """The query's tokens, cut to 3/4 of max_length (FlagEmbedding's query_max_length)."""
        enc = self.tokenizer(query, add_special_tokens=False, truncation=True, max_length=max_length * 3 // 4)
        return enc["input_ids"]

    def room(self, q_ids: Sequence[int], max_length: int) -> int:
        """Tokens left for the passage once the query and the special tokens are in."""
        return max(max_length - len(q_ids) - self.specials, 1)

    def pair(self, q_ids: Sequence[int], d_ids: Sequence[int]) -> list[int]:
        return [*self.prefix, *q_ids, *self.middle, *d_ids, *self.suffix]

    def collate(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask on the CPU (pinned for a fast copy to CUDA)."""
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        if self.device.type == "cuda":
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return ids, mask

    @torch.inference_mode()
    def launch(self, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Start the forward pass of a collated batch; on CUDA this returns before it is done."""
        try:
            ids, mask = (t.to(self.device, non_blocking=True) for t in prepared)
            return self.model(input_ids=ids, attention_mask=mask).logits
        except RuntimeError as exc:
            raise _out_of_memory(exc, self.device) from None

    def finish(self, logits: torch.Tensor) -> list[float]:
        """Wait for the device and return the logits as float32 Python floats."""
        try:
            return logits.view(-1).float().cpu().tolist()
        except RuntimeError as exc:
            raise _out_of_memory(exc, self.device) from None

    def forward(self, batch: Sequence[Sequence[int]]) -> list[float]:
        return self.finish(self.launch(self.collate(batch)))


def _out_of_memory(exc: RuntimeError, device: torch.device) -> Exception:
    """`OutOfMemory` for the batcher to split the batch; any other error unchanged."""
    if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
        return exc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return OutOfMemory(str(exc))


def _pair_template(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Special tokens before, between and after a pair, read off the tokenizer itself.

    transformers 5 dropped `prepare_for_model`; asking the tokenizer for a probe pair keeps the
    layout right for whatever tokenizer the checkpoint ships (XLM-R gives [0], [2, 2], [2]).
    """
    a = tokenizer("a", add_special_tokens=False)["input_ids"]
    b = tokenizer("b", add_special_tokens=False)["input_ids"]
    both = tokenizer("a", "b")["input_ids"]
    for i in range(len(both) - len(a) + 1):
        if both[i : i + len(a)] == a:
            rest = both[i + len(a) :]
            for j in range(len(rest) - len(b) + 1):
                if rest[j : j + len(b)] == b:
                    return both[:i], rest[:j], rest[j + len(b) :]
    raise ValueError(f"cannot find the pair layout of this tokenizer: {both}")


def load_reranker(
    source: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int = 512,
) -> Reranker:
    """Load tokenizer and model from a Hugging Face id or a local folder, ready for inference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch_dtype)
    model.to(dev).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"{source} has {model.config.num_labels} labels; a reranker has one")
    # XLM-R numbers positions from pad_token_id + 1, so two slots of the table are never used.
    limit = int(model.config.max_position_embeddings) - int(model.config.pad_token_id or 0) - 1
    if max_length > limit:
        log.warning("max_length %d exceeds what %s takes; using %d", max_length, source, limit)
        max_length = limit
    prefix, middle, suffix = _pair_template(tokenizer)
    return Reranker(
        source=source,
        tokenizer=tokenizer,
        model=model,
        device=dev,
        dtype=torch_dtype,
        max_length=max_length,
        limit=limit,
        prefix=prefix,
        middle=middle,
        suffix=suffix,
        pad_id=int(tokenizer.pad_token_id),
    )
