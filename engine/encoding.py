"""Text -> pair inputs, and pair logits -> document logits: the one place that knows the layout.

Layout and truncation follow FlagEmbedding's `FlagReranker.compute_score` (docs/reference-scoring.md#flagembeddings-flagreranker), the
reference the scores must match: the query is cut to `max_length * 3 // 4` tokens, the passage to
what is left, and the pair is `<s> q </s></s> p </s>`. A `DocumentPolicy` may instead cut a long
document from the left (TEI), cap it first (Cohere v2 `max_tokens_per_doc`), refuse it (TEI's
`truncate: false`) or score it window by window and keep the best window (Cohere's rule).

Pair inputs leave this module as packed int32 arrays (`Encoded`: lengths and ids back to back),
never as lists of Python ints: they cross a process boundary and become a tensor without any
per-token Python work on the model's side.

Needs only the `tokenizers` package and the checkpoint's tokenizer.json and config.json (from a
folder, or the Hugging Face hub): no transformers and no torch, so the worker process that
tokenizes stays light and never loads the model's libraries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.cost import query_cap
from engine.errors import InputTooLong, InstructionNotAccepted  # noqa: F401  (re-exported: encoding raises them)

log = logging.getLogger(__name__)

#: No token of these tokenizers spans more characters than this. Text further than this many
#: characters per needed token from the kept end cannot change the kept tokens, so it is never
#: tokenized: a 15 MB document costs what a 20 kB one does.
CHARS_PER_TOKEN_BOUND = 32
#: Tokens beyond the needed ones that must come out of a cut text for the cut to be trusted;
#: otherwise (text of unusually long tokens) the whole text is tokenized.
BOUND_MARGIN = 16


@dataclass(frozen=True)
class DocumentPolicy:
    """How a document becomes pair inputs when it does not fit (defaults: FlagEmbedding's)."""

    direction: str = "right"  # which end to cut: "right" keeps the start, "left" keeps the end (TEI)
    max_doc_tokens: int | None = None  # Cohere v2 max_tokens_per_doc: cut the document first
    chunk_overlap: int | None = None  # set: score every window, keep the best (Cohere)
    max_chunks: int = 64
    truncate: bool = True  # False: a pair longer than max_length is an error

    @property
    def chunked(self) -> bool:
        return self.chunk_overlap is not None


@dataclass
class Encoded:
    """Pair inputs of one request: `lengths[i]` tokens of `ids` per pair, back to back.

    `owners[i]` is the document pair i belongs to (several pairs per document when it is cut
    into windows); `truncated[d]` says whether document d had more windows than `max_chunks`.
    """

    lengths: np.ndarray  # int32, one per pair input
    ids: np.ndarray  # int32, all pair inputs back to back
    owners: np.ndarray  # int32, one per pair input
    documents: int
    truncated: np.ndarray | None = None  # bool, one per document (chunked requests only)
    characters: int = 0  # of text tokenized, and the tokens it gave: the worker publishes the
    tokenized: int = 0  # ratio, from which the API estimates a call's cost before it is queued

    @property
    def pairs(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    def sequences(self) -> list[list[int]]:
        """Each pair input as a list (tests and debugging; the hot path never needs this)."""
        ends = np.cumsum(self.lengths)
        return [self.ids[e - n : e].tolist() for e, n in zip(ends, self.lengths)]

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> Encoded:
        """Pair inputs given as token id lists, one document each (tests, benchmarks)."""
        return cls(lengths=np.asarray([len(s) for s in sequences], dtype=np.int32),
                   ids=np.asarray([t for s in sequences for t in s], dtype=np.int32),
                   owners=np.arange(len(sequences), dtype=np.int32), documents=len(sequences))

    @staticmethod
    def concat(parts: Sequence[Encoded]) -> Encoded:
        """Several requests as one (a bulk piece, a benchmark); owners count on across parts."""
        offsets = np.cumsum([0] + [p.documents for p in parts[:-1]])
        return Encoded(
            lengths=np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int32),
            ids=np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int32),
            owners=(np.concatenate([p.owners + o for p, o in zip(parts, offsets)]).astype(np.int32)
                    if parts else np.zeros(0, np.int32)),
            documents=sum(p.documents for p in parts),
            characters=sum(p.characters for p in parts),
            tokenized=sum(p.tokenized for p in parts),
        )


def window_starts(length: int, size: int, overlap: int, max_chunks: int, direction: str) -> tuple[list[int], bool]:
    """Starts of windows of `size` tokens overlapping by `overlap` that tile `length` tokens, and
    whether more than `max_chunks` were needed. Windows are laid from the kept end: from the start
    for "right", from the end for "left" (the mirror image), so cutting text far from the kept
    end never moves a window."""
    if length <= size:
        return [0], False
    step = size - min(overlap, size // 2)
    starts = list(range(0, length - size, step)) + [length - size]  # the last one ends on the last token
    starts = sorted(set(starts))
    truncated = len(starts) > max_chunks
    starts = starts[:max_chunks]
    if direction == "left":
        starts = sorted(length - size - s for s in starts)
    return starts, truncated


def document_spans(lengths: Sequence[int], rooms: Sequence[int], policy: DocumentPolicy, max_length: int
                   ) -> tuple[list[list[tuple[int, int]]], np.ndarray | None]:
    """Which tokens of each document go into its pair inputs: one span (the cut of `policy`), or
    its windows when chunked; and, chunked, whether windows ran out. `rooms[d]` is the room for
    document d's tokens in one pair. Shared by every family (engine/families/)."""
    spans: list[list[tuple[int, int]]] = []
    truncated = np.zeros(len(lengths), dtype=bool) if policy.chunked else None
    for index, (n, room) in enumerate(zip(lengths, rooms)):
        lo, hi = 0, n
        if policy.max_doc_tokens is not None and hi > policy.max_doc_tokens:
            lo, hi = (hi - policy.max_doc_tokens, hi) if policy.direction == "left" else (0, policy.max_doc_tokens)
        length = hi - lo
        if policy.chunked:
            starts, cut = window_starts(length, room, policy.chunk_overlap, policy.max_chunks, policy.direction)
            truncated[index] = cut
            spans.append([(lo + s, lo + min(s + room, length)) for s in starts])
        elif length > room and not policy.truncate:
            raise InputTooLong(f"document {index} makes a pair of more than {max_length} tokens "
                               f"(the model's max_length) and truncation is off")
        elif policy.direction == "left":
            spans.append([(max(lo, hi - room), hi)])
        else:
            spans.append([(lo, lo + min(room, length))])
    return spans, truncated


def pack(heads: Sequence[Sequence[int]], doc_ids: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple[int, int]]],
         tail: Sequence[int], *, truncated: np.ndarray | None = None, characters: int = 0, tokenized: int = 0) -> Encoded:
    """Pair inputs `head[d] + doc[b:e] + tail` for each span of each document, packed."""
    tail_a = np.asarray(tail, dtype=np.int32)
    heads_a = [np.asarray(h, dtype=np.int32) for h in heads]
    owners = np.asarray([i for i, s in enumerate(spans) for _ in s], dtype=np.int32)
    lengths = np.asarray([len(heads_a[i]) + (e - b) + len(tail_a) for i, s in enumerate(spans) for b, e in s],
                         dtype=np.int32)
    ids = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for head, d, doc_spans in zip(heads_a, doc_ids, spans):
        for b, e in doc_spans:
            ids[pos : pos + len(head)] = head
            pos += len(head)
            ids[pos : pos + e - b] = d[b:e]
            pos += e - b
            ids[pos : pos + len(tail_a)] = tail_a
            pos += len(tail_a)
    return Encoded(lengths=lengths, ids=ids, owners=owners, documents=len(doc_ids), truncated=truncated,
                   characters=characters, tokenized=tokenized)


def best_per_document(logits: np.ndarray, encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
    """Each document's best window logit, and how many windows it had."""
    best = np.full(encoded.documents, -np.inf, dtype=np.float64)
    np.maximum.at(best, encoded.owners, np.asarray(logits, dtype=np.float64))
    return best, np.bincount(encoded.owners, minlength=encoded.documents)


class Encoder:
    """A tokenizer with the pair layout of its model and the model's length limits: the
    cross-encoder family's encoder (engine/families/cross_encoder.py), and the base of the others."""

    family = "cross-encoder"
    activation = "sigmoid"  # engine/scoring.py: what turns a raw score into relevance
    takes_instruction = False

    def __init__(self, tokenizer, *, max_length: int, limit: int, prefix: Sequence[int], middle: Sequence[int],
                 suffix: Sequence[int], pad_id: int) -> None:
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`, truncation and padding off
        self.limit = limit  # the longest input the checkpoint's position table allows
        self.max_length = min(max_length, limit)
        self.prefix, self.middle, self.suffix = list(prefix), list(middle), list(suffix)
        self.pad_id = pad_id

    @classmethod
    def load(cls, source: str, max_length: int = 512) -> Encoder:
        """The tokenizer of a Hugging Face id or a local folder, and its model's limits."""
        tokenizer, config = load_tokenizer(source)
        # XLM-R numbers positions from pad_token_id + 1, so two slots of the table are never used.
        pad_id = int(config.get("pad_token_id", tokenizer.token_to_id("<pad>")))
        limit = int(config["max_position_embeddings"]) - pad_id - 1
        if max_length > limit:
            log.warning("max_length %d exceeds what %s takes; using %d", max_length, source, limit)
        prefix, middle, suffix = _pair_template(tokenizer)
        return cls(tokenizer, max_length=max_length, limit=limit, prefix=prefix, middle=middle, suffix=suffix,
                   pad_id=pad_id)

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @property
    def template_tokens(self) -> int:
        """Tokens a pair carries besides the query and the document (engine/cost.py Layout)."""
        return self.specials

    def describe(self) -> dict[str, object]:
        """What the heartbeat and /v1/models say of the family (worker/context.py)."""
        return {"family": self.family, "instruction": self.takes_instruction, "context_length": self.max_length,
                "activation": self.activation, "template_tokens": self.template_tokens}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens (the Rust tokenizer runs with the GIL released)."""
        if not texts:
            return []
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def query_ids(self, query: str, max_length: int) -> list[int]:
        """The query's tokens, cut to 3/4 of max_length (FlagEmbedding's query_max_length)."""
        cap = query_cap(max_length)
        return self._bounded_tokens([query], [cap], ["right"])[0][0][:cap]

    def room(self, q_ids: Sequence[int], max_length: int) -> int:
        """Tokens left for the passage once the query and the special tokens are in."""
        return max(max_length - len(q_ids) - self.specials, 1)

    def pair(self, q_ids: Sequence[int], d_ids: Sequence[int]) -> list[int]:
        return [*self.prefix, *q_ids, *self.middle, *d_ids, *self.suffix]

    # --- the main entry ----------------------------------------------------------------------------
    def encode(self, query: str, documents: Sequence[str], policy: DocumentPolicy = DocumentPolicy(),
               max_length: int | None = None, *, instruction: str | None = None) -> Encoded:
        """Pair inputs of `query` with each document, as `policy` says long documents are handled.
        A cross-encoder takes no instruction (InstructionNotAccepted)."""
        if instruction is not None:
            raise InstructionNotAccepted(f"{self.family} models take no instruction")
        max_length = min(max_length or self.max_length, self.limit)
        q_ids = self.query_ids(query, max_length)
        needed = _tokens_needed(self.room(q_ids, max_length), policy)
        doc_ids, chars = self._bounded_tokens(documents, [needed] * len(documents), [policy.direction] * len(documents))
        return self._pack(q_ids, doc_ids, policy, max_length, characters=sum(chars), tokenized=sum(map(len, doc_ids)))

    def _pack(self, q_ids: list[int], doc_ids: list[list[int]], policy: DocumentPolicy, max_length: int, *,
              characters: int, tokenized: int) -> Encoded:
        """One request's pair inputs from its query's and documents' tokens."""
        room = self.room(q_ids, max_length)
        spans, truncated = document_spans([len(d) for d in doc_ids], [room] * len(doc_ids), policy, max_length)
        head = self.prefix + q_ids + self.middle
        return pack([head] * len(doc_ids), doc_ids, spans, self.suffix, truncated=truncated,
                    characters=characters, tokenized=tokenized)

    def encode_many(self, requests: Sequence[tuple[str, Sequence[str]]], policy: DocumentPolicy = DocumentPolicy(),
                    max_length: int | None = None, *, instruction: str | None = None) -> list[Encoded]:
        """`encode` of each (query, documents) request, the texts of all of them through the tokenizer
        in one call: a bulk piece holds hundreds of requests, and a call for each (a fixed cost
        per call, and small batches its threads split badly) tokenized a 4 096-pair piece in 20-25 %
        more wall time; W4 on the simulated H100 did 1.05-1.09 x with one call. The documents are cut
        for the most room an empty query would leave, a bound at least as long as each request's
        exact one, so their kept tokens are those `encode` keeps. A family whose encoder lays out
        pairs its own way (engine/families/prompt.py) keeps one `encode` per request."""
        if type(self).encode is not Encoder.encode:
            return [self.encode(q, docs, policy, max_length, instruction=instruction) for q, docs in requests]
        if instruction is not None:
            raise InstructionNotAccepted(f"{self.family} models take no instruction")
        max_length = min(max_length or self.max_length, self.limit)
        cap = query_cap(max_length)
        widest = _tokens_needed(self.room((), max_length), policy)
        texts: list[str] = []
        needed: list[int] = []
        directions: list[str] = []
        for query, documents in requests:
            texts += [query, *documents]
            needed += [cap] + [widest] * len(documents)
            directions += ["right"] + [policy.direction] * len(documents)
        tokens, chars = self._bounded_tokens(texts, needed, directions)
        out, at = [], 0
        for _, documents in requests:
            q_ids, doc_ids = tokens[at][:cap], tokens[at + 1 : at + 1 + len(documents)]
            doc_chars = chars[at + 1 : at + 1 + len(documents)]
            at += 1 + len(documents)
            out.append(self._pack(q_ids, doc_ids, policy, max_length, characters=sum(doc_chars),
                                  tokenized=sum(map(len, doc_ids))))
        return out

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> tuple[Encoded, np.ndarray]:
        """Many (query, document) pairs as one Encoded (each distinct query tokenized once), and
        for each input pair the row that holds it (benchmarks and the in-process ceiling)."""
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        parts, order = [], []
        for query, indices in by_query.items():
            parts.append(self.encode(query, [pairs[i][1] for i in indices], max_length=max_length))
            order.extend(indices)
        where = np.empty(len(pairs), dtype=np.int64)
        where[np.asarray(order, dtype=np.int64)] = np.arange(len(pairs))
        return Encoded.concat(parts), where

    # --- bounded tokenization ------------------------------------------------------------------------
    def _bounded_tokens(self, texts: Sequence[str], needed: Sequence[int],
                        directions: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Tokens of each text, of which at least the `needed` ones at its kept end (`directions`)
        are exact; and how many characters of each were tokenized.

        Text far beyond the kept end is cut before tokenizing (bounded time and memory for any
        input); a cut whose result is too short to trust is redone on the whole text.
        """
        cut = [_cut(t, n, d) for t, n, d in zip(texts, needed, directions)]
        tokens = self.tokenize(cut)
        for i, (text, part, n) in enumerate(zip(texts, cut, needed)):
            if len(part) < len(text) and len(tokens[i]) < n + BOUND_MARGIN:
                cut[i], tokens[i] = text, self.tokenize([text])[0]
        return tokens, [len(c) for c in cut]


def _tokens_needed(room: int, policy: DocumentPolicy) -> int:
    """How many tokens from a document's kept end can matter under `policy` (one more than are
    used, so that a cut is noticed)."""
    if policy.chunked:
        step = room - min(policy.chunk_overlap, room // 2)
        needed = room + policy.max_chunks * step + 1
    else:
        needed = room + 1
    if policy.max_doc_tokens is not None:
        needed = min(needed, policy.max_doc_tokens + 1)
    return needed


def _cut(text: str, tokens: int, direction: str) -> str:
    limit = tokens * CHARS_PER_TOKEN_BOUND + 1024
    if len(text) <= limit:
        return text
    return text[-limit:] if direction == "left" else text[:limit]


def load_tokenizer(source: str):
    """A checkpoint's `tokenizers.Tokenizer` (truncation and padding off) and its config.json."""
    from tokenizers import Tokenizer

    config = json.loads(Path(_checkpoint_file(source, "config.json")).read_text())
    tokenizer_file = _checkpoint_file(source, "tokenizer.json", required=False)
    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(tokenizer_file)
    else:  # only a slow (sentencepiece) tokenizer: let transformers convert it once
        from transformers import AutoTokenizer

        tokenizer = Tokenizer.from_str(AutoTokenizer.from_pretrained(source).backend_tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, config


def _checkpoint_file(source: str, name: str, required: bool = True) -> str | None:
    """A file of a checkpoint: from its folder, or downloaded (and cached) from the hub."""
    folder = Path(source)
    if folder.is_dir():
        if (folder / name).exists():
            return str(folder / name)
        if required:
            raise FileNotFoundError(f"{folder / name} is missing")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(source, name)
    except EntryNotFoundError:
        if required:
            raise
        return None


def _pair_template(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Special tokens before, between and after a pair, read off the tokenizer's own
    post-processor (XLM-R gives [0], [2, 2], [2]): right for whatever tokenizer a checkpoint ships."""
    a = tokenizer.encode("a", add_special_tokens=False).ids
    b = tokenizer.encode("b", add_special_tokens=False).ids
    both = tokenizer.encode("a", "b", add_special_tokens=True).ids
    for i in range(len(both) - len(a) + 1):
        if both[i : i + len(a)] == a:
            rest = both[i + len(a) :]
            for j in range(len(rest) - len(b) + 1):
                if rest[j : j + len(b)] == b:
                    return both[:i], rest[:j], rest[j + len(b) :]
    raise ValueError(f"cannot find the pair layout of this tokenizer: {both}")
