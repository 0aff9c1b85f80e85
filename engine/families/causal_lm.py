"""A causal LM as a scorer: the score tokens' logits at each row's last real token.

The references (Qwen3-Reranker's model card, FlagLLMReranker) run the whole LM head at every
position and keep one row of one position. Here the base model runs alone, the hidden state of
each row's last real token is gathered, and only the LM-head rows of the score tokens are
applied: the same numbers (the final norm is inside the base model), without a
rows x width x vocab (151 669 for Qwen3) product that would dominate memory and time.

Batches are right-padded (engine/batcher.py). A causal model's real tokens never attend to the
pads after them and their positions are 0..n-1 as in an unpadded pass, so the base model is run
with no attention mask at all: attention takes its causal fast path (no 4-D mask is built) and
the last real position's hidden state is the unpadded one. The rows CUDA graphs add to fill a
bucket have one attended token (buckets.pad_to): their gather index is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.modeling_outputs import SequenceClassifierOutput


class LastTokenScore(torch.nn.Module):
    """score = sum_k weight_k * logit(token_k) at the last real token (Qwen3: yes - no)."""

    def __init__(self, base: torch.nn.Module, rows: torch.Tensor, weights: Sequence[float],
                 softcap: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.config = base.config
        self.register_buffer("rows", rows.detach().clone(), persistent=False)  # k x hidden
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32), persistent=False)
        self.softcap = softcap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        hidden = self.base(input_ids=input_ids).last_hidden_state  # causal: right pads are never seen
        last = attention_mask.sum(dim=1) - 1
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # rows x hidden
        logits = picked.float() @ self.rows.float().T  # rows x k
        if self.softcap:  # Gemma-2's final_logit_softcapping, where a checkpoint has it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return SequenceClassifierOutput(logits=(logits @ self.weights)[:, None])


def load(source: str, dtype: torch.dtype, tokens: Sequence[int], weights: Sequence[float]) -> LastTokenScore:
    """A checkpoint's base model and the LM-head rows of `tokens` (the rest of the head is dropped)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    head = lm.get_output_embeddings().weight
    rows = head[torch.as_tensor(list(tokens))].detach().clone()
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    del lm, head
    return LastTokenScore(base, rows, weights, softcap=softcap)

