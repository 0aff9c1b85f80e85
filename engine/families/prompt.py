"""Pairs as a prompt around the texts: the tokenizer side of the causal-LM families (Qwen3, gemma).

Decoder rerankers are scored on a prompt: fixed tokens, the query, the document, fixed tokens.
Their references tokenize the text before the document and the document as ONE string (Qwen3:
`<Instruct>: … <Query>: … <Document>: {doc}`; gemma: `B: {passage}`), and a byte-level BPE
merges across that seam (`": " + "Paris"` is `":"`, `" Paris"`, not `": "`, `"Paris"`). So each
document is tokenized after its joint head, and the tokens are split at the head's last
character by their offsets: the head's tokens, then the document's, exactly the reference's
tokens; long documents are then cut, capped or windowed on the document's tokens (the same
`DocumentPolicy` rules as the cross-encoders, engine/encoding.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.encoding import (
    BOUND_MARGIN,
    DocumentPolicy,
    Encoded,
    Encoder,
    InstructionNotAccepted,
    _cut,
    _tokens_needed,
    document_spans,
    pack,
)


class PromptEncoder(Encoder):
    """An Encoder whose pairs are `lead + tokens(joint_head + document) + tail`.

    Subclasses give `head(query, instruction, max_length)` -> (lead ids, joint head text) and
    the tail ids; `tail_in_budget` says whether max_length counts the tail (Qwen3) or the tail
    is added after the cut (FlagLLMReranker's prompt).
    """

    family = "prompt"
    takes_instruction = False
    tail_in_budget = True

    def __init__(self, tokenizer, *, max_length: int, limit: int, pad_id: int, tail: Sequence[int]) -> None:
        super().__init__(tokenizer, max_length=max_length, limit=limit, prefix=[], middle=[], suffix=tail,
                         pad_id=pad_id)

    def head(self, query: str, instruction: str | None, max_length: int) -> tuple[list[int], str]:
        raise NotImplementedError

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def template_tokens(self) -> int:
        lead, joint = self.head("", None, self.max_length)
        return len(lead) + len(self.ids(joint)) + (len(self.suffix) if self.tail_in_budget else 0)

    def _split(self, texts: list[str], cut: int) -> tuple[list[list[int]], list[list[int]]]:
        """Each text tokenized whole; its tokens before character `cut` and from it on."""
        heads, docs = [], []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids, offsets = enc.ids, enc.offsets
            k = next((i for i, (_, end) in enumerate(offsets) if end > cut), len(ids))
            heads.append(ids[:k])
            docs.append(ids[k:])
        return heads, docs

    def encode(self, query: str, documents: Sequence[str], policy: DocumentPolicy = DocumentPolicy(),
               max_length: int | None = None, *, instruction: str | None = None) -> Encoded:
        """Pair inputs of `query` with each document, as `policy` says long documents are handled."""
        if instruction is not None and not self.takes_instruction:
            raise InstructionNotAccepted(f"{self.family} models take no instruction")
        max_length = min(max_length or self.max_length, self.limit)
        lead, joint = self.head(query, instruction, max_length)
        budget = max_length - (len(self.suffix) if self.tail_in_budget else 0)
        needed = _tokens_needed(budget, policy)
        cut = [_cut(d, needed, policy.direction) for d in documents]
        joint_heads, doc_ids = self._split([joint + d for d in cut], len(joint))
        for i, (doc, part) in enumerate(zip(documents, cut)):  # a cut too short to trust: redo it whole
            if len(part) < len(doc) and len(doc_ids[i]) < needed + BOUND_MARGIN:
                cut[i] = doc
                (joint_heads[i],), (doc_ids[i],) = self._split([joint + doc], len(joint))
        heads, rooms = [], []
        for jh in joint_heads:
            h = lead + jh
            if len(h) >= budget:  # a query longer than the budget: the pair is cut inside it
                h = h[: budget - 1]
            heads.append(h)
            rooms.append(budget - len(h))
        spans, truncated = document_spans([len(d) for d in doc_ids], rooms, policy, max_length)
        return pack(heads, doc_ids, spans, self.suffix, truncated=truncated,
                    characters=sum(map(len, cut)), tokenized=sum(map(len, doc_ids)))


def checked_template(template: dict | None, keys: set[str] | frozenset[str], family: str) -> dict:
    """A template from the JSON form of MODELS, refused if it names a key the family does not take."""
    template = dict(template or {})
    unknown = set(template) - set(keys)
    if unknown:
        raise ValueError(f"a {family} template takes {sorted(keys)}, not {sorted(unknown)}")
    return template


def limit_of(config: dict) -> int:
    """The longest input a decoder's position table takes."""
    return int(config.get("max_position_embeddings") or 8192)


def pad_of(tokenizer, config: dict, *names: str) -> int:
    """A pad id: the config's, else the first of `names` the tokenizer has (right padding is
    never attended by a real token of a causal model, so any id would do)."""
    if config.get("pad_token_id") is not None:
        return int(config["pad_token_id"])
    for name in names:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return int(token)
    return 0


def single_token(tokenizer, text: str) -> int:
    """The id of `text`, which must be one token of the vocabulary."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens in this tokenizer; its family scores it as one")
    return int(ids[0])
