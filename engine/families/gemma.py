"""bge-reranker-v2-gemma: a Gemma causal LM asked "Yes" or "No", as FlagEmbedding's FlagLLMReranker scores it.

The layout: `<bos>`, the tokens of `A: {query}` cut to 3/4 of max_length, `\\n`, the tokens of
`B: {passage}`; that pair cut from the passage's end to max_length tokens; then, after the cut,
`\\n` and the fixed prompt. The score is the logit of the first token of `Yes` at the last real
token, its relevance the sigmoid (FlagLLMReranker's `normalize=True`). It takes no instruction.

A JSON MODELS entry may override the prompt: `"template": {"prompt": ...}`.
"""

from __future__ import annotations

from engine.cost import query_cap
from engine.families import CONTEXT_LENGTHS
from engine.families import causal_lm_dtype as _dtype
from engine.families.prompt import PromptEncoder, checked_template, limit_of, pad_of

NAME = "gemma"
ACTIVATION = "sigmoid"
TAKES_INSTRUCTION = False
CONTEXT_LENGTH = CONTEXT_LENGTHS[NAME]

PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
          "providing a prediction of either 'Yes' or 'No'.")
SEP = "\n"
TEMPLATE_KEYS = {"prompt"}


class GemmaEncoder(PromptEncoder):
    family = NAME
    activation = ACTIVATION
    takes_instruction = False
    tail_in_budget = False  # the prompt comes after the cut

    def __init__(self, tokenizer, *, max_length: int, limit: int, pad_id: int, bos_id: int, prompt: str = PROMPT) -> None:
        sep = tokenizer.encode(SEP, add_special_tokens=False).ids
        tail = sep + tokenizer.encode(prompt, add_special_tokens=False).ids
        super().__init__(tokenizer, max_length=max_length, limit=limit, pad_id=pad_id, tail=tail)
        self.bos_id, self.sep = bos_id, sep

    def head(self, query: str, instruction: str | None, max_length: int) -> tuple[list[int], str]:
        q = self.ids(f"A: {query}")[: query_cap(max_length)]
        return [self.bos_id, *q, *self.sep], "B: "


def encoder(source: str, max_length: int | None = None, template: dict | None = None) -> GemmaEncoder:
    from engine.encoding import load_tokenizer

    template = checked_template(template, TEMPLATE_KEYS, "gemma")
    tokenizer, config = load_tokenizer(source)
    limit = limit_of(config)
    bos = config.get("bos_token_id")
    bos = int(bos) if bos is not None else int(tokenizer.token_to_id("<bos>"))
    return GemmaEncoder(tokenizer, max_length=min(max_length or CONTEXT_LENGTH, limit), limit=limit,
                        pad_id=pad_of(tokenizer, config, "<pad>"), bos_id=bos, **template)


def score_tokens(source: str) -> list[int]:
    """The first token of `Yes` (FlagLLMReranker's yes_loc)."""
    from engine.encoding import load_tokenizer

    tokenizer, _ = load_tokenizer(source)
    return [int(tokenizer.encode("Yes", add_special_tokens=False).ids[0])]


def dtype(requested: str, device_type: str) -> str:
    return _dtype(requested, device_type)


def load_model(source: str, dtype):
    from engine.encoding import load_tokenizer
    from engine.families import causal_lm

    tokenizer, config = load_tokenizer(source)
    model = causal_lm.load(source, dtype, score_tokens(source), weights=(1.0,))
    return model, pad_of(tokenizer, config, "<pad>")
