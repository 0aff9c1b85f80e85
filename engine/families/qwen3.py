"""Qwen3-Reranker (0.6B, 4B, 8B): a Qwen3 causal LM asked "yes" or "no", as its model card scores it.

The prompt: the system prefix, then the user text `<Instruct>: {instruction}\\n<Query>: {query}\\n
<Document>: {doc}` (the default instruction when none is given) tokenized without special tokens
and cut to `max_length - len(prefix) - len(suffix)` tokens, then the assistant suffix with its
empty think block. The score is taken at the last real token: `logit(yes) - logit(no)` (the raw
score, vLLM's `classifier_from_token: ["no", "yes"]` folded into one row), and the relevance
`sigmoid(yes - no)`, which equals the card's `exp(log_softmax([no, yes])[yes])`.

A JSON MODELS entry may override the strings: `"template": {"instruction": ..., "prefix": ...,
"suffix": ...}`.
"""

from __future__ import annotations

from engine.families import CONTEXT_LENGTHS
from engine.families import causal_lm_dtype as _dtype
from engine.families.prompt import PromptEncoder, checked_template, limit_of, pad_of, single_token

NAME = "qwen3"
ACTIVATION = "sigmoid"
TAKES_INSTRUCTION = True
CONTEXT_LENGTH = CONTEXT_LENGTHS[NAME]

PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
USER = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: "
TEMPLATE_KEYS = {"instruction", "prefix", "suffix"}


class Qwen3Encoder(PromptEncoder):
    family = NAME
    activation = ACTIVATION
    takes_instruction = True
    tail_in_budget = True

    def __init__(self, tokenizer, *, max_length: int, limit: int, pad_id: int, prefix: str = PREFIX,
                 suffix: str = SUFFIX, instruction: str = DEFAULT_INSTRUCTION) -> None:
        tail = tokenizer.encode(suffix, add_special_tokens=False).ids
        super().__init__(tokenizer, max_length=max_length, limit=limit, pad_id=pad_id, tail=tail)
        self.lead = tokenizer.encode(prefix, add_special_tokens=False).ids
        self.default_instruction = instruction

    def head(self, query: str, instruction: str | None, max_length: int) -> tuple[list[int], str]:
        text = USER.format(instruction=self.default_instruction if instruction is None else instruction, query=query)
        return list(self.lead), text


def encoder(source: str, max_length: int | None = None, template: dict | None = None) -> Qwen3Encoder:
    from engine.encoding import load_tokenizer

    template = checked_template(template, TEMPLATE_KEYS, "qwen3")
    tokenizer, config = load_tokenizer(source)
    limit = limit_of(config)
    return Qwen3Encoder(tokenizer, max_length=min(max_length or CONTEXT_LENGTH, limit), limit=limit,
                        pad_id=pad_of(tokenizer, config, "<|endoftext|>", "<|im_end|>"), **template)


def score_tokens(source: str) -> list[int]:
    """Ids of `yes` and `no`, each one token of the vocabulary (the card's convert_tokens_to_ids)."""
    from engine.encoding import load_tokenizer

    tokenizer, _ = load_tokenizer(source)
    return [single_token(tokenizer, "yes"), single_token(tokenizer, "no")]


def dtype(requested: str, device_type: str) -> str:
    return _dtype(requested, device_type)


def load_model(source: str, dtype):
    from engine.encoding import load_tokenizer
    from engine.families import causal_lm

    tokenizer, config = load_tokenizer(source)
    model = causal_lm.load(source, dtype, score_tokens(source), weights=(1.0, -1.0))
    return model, pad_of(tokenizer, config, "<|endoftext|>", "<|im_end|>")
