"""Cross-encoders (bge-reranker-base, -large, -v2-m3): a sequence classifier with one label.

The pair layout and truncation are FlagEmbedding's `FlagReranker` (engine/encoding.py, the
original encoder of this service); the score is the classifier's logit, its relevance the sigmoid.
"""

from __future__ import annotations

from engine.encoding import Encoder
from engine.families import CONTEXT_LENGTHS

NAME = "cross-encoder"
ACTIVATION = "sigmoid"
TAKES_INSTRUCTION = False
CONTEXT_LENGTH = CONTEXT_LENGTHS[NAME]


def encoder(source: str, max_length: int | None = None, template: dict | None = None) -> Encoder:
    if template:
        raise ValueError("a cross-encoder takes no template: its tokenizer's own pair layout is used")
    return Encoder.load(source, max_length or CONTEXT_LENGTH)


def dtype(requested: str, device_type: str) -> str:
    return requested  # the backend's choice (fp16 on CUDA: FlagReranker's use_fp16)


def load_model(source: str, dtype):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype)
    if model.config.num_labels != 1:
        raise ValueError(f"{source} has {model.config.num_labels} labels; a reranker has one")
    return model, int(model.config.pad_token_id)
