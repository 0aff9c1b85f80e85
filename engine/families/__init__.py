"""Model families: what differs between rerankers that are scored the same way otherwise.

A family decides how a (query, document) pair becomes tokens (template, instruction, truncation),
which output of the network is the score and which activation turns it into a relevance; a
backend (engine/backends/) only runs padded batches of whatever the family built. A family is
one module here exposing:

    NAME, ACTIVATION, TAKES_INSTRUCTION, CONTEXT_LENGTH (the max_length served by default)
    encoder(source, max_length, template) -> an Encoder (engine/encoding.py): the tokenizer side;
        needs only `tokenizers`, runs in the worker process
    load_model(source, dtype) -> (torch module, pad id): called with the backend, in the engine
        process; the module's `forward(input_ids, attention_mask).logits` is one score per row
        of a right-padded batch
    dtype(requested, device_type) -> the dtype name to load with ("auto" resolved by the backend)

Adding a family (bge-reranker-v2-minicpm-layerwise, mxbai-rerank-v2, a Qwen3-Reranker converted
to sequence classification) is one module and one line in FAMILIES (and ARCHITECTURES when its
config.json names an architecture of its own). docs/models.md says more.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

FAMILIES: dict[str, str] = {
    "cross-encoder": "engine.families.cross_encoder",
    "qwen3": "engine.families.qwen3",
    "gemma": "engine.families.gemma",
}

#: The max_length each family serves when nothing says otherwise (Qwen3-Reranker takes 32 k tokens;
#: 8192 keeps one pair's attention and memory in reason; FlagLLMReranker's default is 512).
CONTEXT_LENGTHS: dict[str, int] = {"cross-encoder": 512, "qwen3": 8192, "gemma": 512}

#: config.json `architectures` that name a family on their own (anything else: cross-encoder,
#: which accepts every *ForSequenceClassification with one label).
ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
}


def detect(config: dict) -> str:
    """The family a checkpoint's config.json implies."""
    for arch in config.get("architectures") or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    return "cross-encoder"


def detect_folder(source: str) -> str | None:
    """The family of a local checkpoint folder, from its config.json (None when it is not a
    readable folder: a hub id, or a folder the API process cannot see). Reads JSON only."""
    config = Path(source) / "config.json"
    try:
        return detect(json.loads(config.read_text()))
    except (OSError, ValueError):
        return None


def get(name: str) -> ModuleType:
    """The family module called `name`."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def family_of(source: str, family: str | None = None) -> ModuleType:
    """The family of a checkpoint: the one named, else the one its config.json implies."""
    if family:
        return get(family)
    from engine.encoding import _checkpoint_file

    return get(detect(json.loads(Path(_checkpoint_file(source, "config.json")).read_text())))


def causal_lm_dtype(requested: str, device_type: str) -> str:
    """The causal-LM families' dtype rule, without importing torch: `auto` on CUDA is bfloat16
    (fp16's range is too narrow for these decoders' activations: docs/models.md)."""
    if requested == "auto" and device_type == "cuda":
        return "bfloat16"
    return requested
