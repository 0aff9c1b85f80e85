"""Long documents: best-chunk scoring, truncation options, out-of-memory splitting, TEI's /rerank."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import requests
import torch

from engine import DocumentPolicy, Encoded, InputTooLong
from engine.backends.torch_eager import TorchBackend
from engine.batcher import Batcher
from engine.encoding import best_per_document, window_starts
from rerank.random_model import documents_of_length


@pytest.fixture(scope="module")
def long_doc(tokenizer) -> str:
    return documents_of_length(tokenizer, [1500], seed=21)[0]


def doc_tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def windows(tokens, size, overlap, max_chunks=1000, direction="right"):
    starts, _ = window_starts(len(tokens), size, overlap, max_chunks, direction)
    return [tokens[s : s + size] for s in starts]


@pytest.mark.parametrize("n, size, overlap", [(10, 4, 1), (11, 4, 1), (5, 4, 0), (1000, 100, 30), (3, 8, 2)])
@pytest.mark.parametrize("direction", ["right", "left"])
def test_windows_cover_the_document_with_the_overlap(n, size, overlap, direction):
    tokens = list(range(n))
    parts = windows(tokens, size, overlap, direction=direction)
    assert all(len(p) == min(size, n) for p in parts)
    assert sorted({t for p in parts for t in p}) == tokens
    for a, b in zip(parts, parts[1:]):
        assert a[0] < b[0] and len(set(a) & set(b)) >= min(overlap, size // 2)


def test_windows_are_laid_from_the_kept_end_and_say_when_they_stop():
    right, cut = window_starts(1000, 100, 30, 3, "right")
    assert right == [0, 70, 140] and cut
    left, cut = window_starts(1000, 100, 30, 3, "left")
    assert left == [760, 830, 900] and cut  # the mirror image: the last window ends on the last token
    assert window_starts(150, 100, 30, 3, "right") == ([0, 50], False)


def test_chunked_score_is_the_max_of_each_window_scored_alone(engine, tokenizer, long_doc):
    policy = DocumentPolicy(chunk_overlap=16, max_chunks=64)
    query = "which part talks about the queue"
    enc = engine.encoder
    encoded = enc.encode(query, ["short one", long_doc], policy, max_length=128)
    best, chunks = best_per_document(engine.run(encoded), encoded)
    assert chunks[0] == 1 and chunks[1] > 10 and not encoded.truncated.any()
    q_ids = enc.query_ids(query, 128)
    room = enc.room(q_ids, 128)
    alone = [engine.run(Encoded.from_sequences([enc.pair(q_ids, w)]))[0] for w in windows(doc_tokens(tokenizer, long_doc), room, 16, 64)]
    assert len(alone) == chunks[1]
    assert abs(best[1] - max(alone)) < 1e-5
    # Without chunking the document is cut FlagEmbedding's way: only its first window counts.
    (plain,) = engine.run(enc.encode(query, [long_doc], max_length=128))
    assert abs(plain - alone[0]) < 1e-5
    # With fewer windows than the document needs, the answer says it was truncated.
    few = enc.encode(query, ["short one", long_doc], DocumentPolicy(chunk_overlap=16, max_chunks=3), max_length=128)
    assert few.truncated.tolist() == [False, True] and few.pairs == 4


def test_left_truncation_and_max_tokens_per_doc(engine, tokenizer, long_doc):
    enc = engine.encoder
    tokens = doc_tokens(tokenizer, long_doc)
    q_ids = enc.query_ids("q", 128)
    room = enc.room(q_ids, 128)
    (left,) = enc.encode("q", [long_doc], DocumentPolicy(direction="left"), max_length=128).sequences()
    assert left == enc.pair(q_ids, tokens[-room:])
    (capped,) = enc.encode("q", [long_doc], DocumentPolicy(max_doc_tokens=40)).sequences()
    assert capped == enc.pair(enc.query_ids("q", 512), tokens[:40])
    with pytest.raises(InputTooLong):
        enc.encode("q", [long_doc], DocumentPolicy(truncate=False), max_length=128)


@pytest.fixture(scope="module")
def huge_doc(engine, tokenizer) -> tuple[str, list[int]]:
    """About 900 000 characters, and all its tokens."""
    huge = " ".join([documents_of_length(tokenizer, [3000], seed=5)[0]] * 200)
    return huge, engine.encoder.tokenize([huge])[0]


@pytest.mark.parametrize("policy", [DocumentPolicy(), DocumentPolicy(direction="left"),
                                    DocumentPolicy(chunk_overlap=32, max_chunks=4),
                                    DocumentPolicy(chunk_overlap=32, max_chunks=4, direction="left")])
def test_huge_documents_are_cut_before_tokenizing_without_changing_any_pair(engine, huge_doc, policy):
    """Only text within reach of the kept tokens is tokenized (a 15 MB document must not stall a
    worker), and the pair inputs are exactly those of the whole text tokenized."""
    enc = engine.encoder
    huge, whole = huge_doc
    q_ids = enc.query_ids("q", 512)
    room = enc.room(q_ids, 512)
    got = enc.encode("q", [huge], policy)
    if policy.chunk_overlap is None:
        kept = whole[-room:] if policy.direction == "left" else whole[:room]
        assert got.sequences() == [enc.pair(q_ids, kept)]
    else:
        expected = [enc.pair(q_ids, w) for w in windows(whole, room, 32, 4, policy.direction)]
        assert got.sequences() == expected and got.truncated.tolist() == [True]
    assert got.characters < len(huge) / 10  # most of the text was never tokenized


@pytest.mark.parametrize("policy", [DocumentPolicy(), DocumentPolicy(direction="left"),
                                    DocumentPolicy(chunk_overlap=32, max_chunks=4),
                                    DocumentPolicy(max_doc_tokens=40, direction="left")])
def test_a_bulk_piece_tokenized_in_one_call_gives_each_request_what_encode_gives(engine, tokenizer, huge_doc,
                                                                                 policy):
    """encode_many (a piece's items through the tokenizer at once, documents cut for the widest
    room) against encode per item: the same pairs, lengths, cuts and character counts."""
    enc = engine.encoder
    huge, _ = huge_doc
    texts = documents_of_length(tokenizer, [5, 40, 200, 700, 1500], seed=9)
    requests_ = [("q", texts[:2]), ("a much longer query " * 30, [huge, texts[2]]), ("", texts[3:]),
                 ("q2", [])]
    for max_length in (512, 128):
        many = enc.encode_many(requests_, policy, max_length)
        for (query, docs), got in zip(requests_, many, strict=True):
            one = enc.encode(query, docs, policy, max_length)
            assert got.sequences() == one.sequences() and got.owners.tolist() == one.owners.tolist()
            assert (got.truncated is None) == (one.truncated is None)
            assert got.truncated is None or got.truncated.tolist() == one.truncated.tolist()
            # Cut for the widest room, a huge document gives more of its text to the tokenizer,
            # at the same characters per token (what the worker measures and the API prices by).
            assert got.characters >= one.characters and got.tokenized >= one.tokenized
            if one.tokenized:
                assert got.characters / got.tokenized == pytest.approx(one.characters / one.tokenized, rel=0.05)


def test_out_of_memory_in_the_scoring_path_is_recovered_by_splitting(engine, tokenizer, monkeypatch):
    """The real torch backend whose model runs out of memory on batches of more than two pairs."""
    backend: TorchBackend = engine.scorer.batcher.backend
    texts = documents_of_length(tokenizer, [30, 60, 90, 120, 150, 180, 210], seed=3)
    encoded = engine.encoder.encode("q", texts)
    expected = engine.run(encoded)
    real_forward = backend.model.forward
    tried, ran = [], []

    def forward(*args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        tried.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        ran.append(rows)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", forward)
    batcher = Batcher(backend, max_batch_tokens=100_000).start()
    try:
        got = batcher.submit(encoded.lengths, encoded.ids).wait(30)
    finally:
        batcher.stop()
    assert tried[0] == 7 and max(ran) <= 2 and sum(ran) == 7  # tried whole, then recovered in halves
    assert np.max(np.abs(got - expected)) < 1e-5


# --- over HTTP --------------------------------------------------------------------------------------


@pytest.mark.stack
def test_20000_token_document_is_scored_not_rejected_and_a_cut_is_said(api, tokenizer):
    huge = documents_of_length(tokenizer, [20000], seed=4)[0]
    r = api.post("/v1/rerank", {"query": "needle", "documents": [huge, "small"]})
    assert r.status_code == 200, r.text
    assert "truncated" not in r.json()["results"][0] and "chunks" not in r.json()["results"][0]
    # About 42 windows are needed; MAX_CHUNKS is 32 in the tests: the answer says the end was not scored.
    r = api.post("/v1/rerank", {"query": "needle", "documents": [huge, "small"], "chunking": {"max_chunks": 1000},
                                "return_chunks": True})
    assert r.status_code == 200, r.text
    got = {x["index"]: (x["chunks"], x["truncated"]) for x in r.json()["results"]}
    assert got == {0: (32, True), 1: (1, False)}
    r = api.post("/v1/rerank", {"query": "needle", "documents": [huge], "max_chunks_per_doc": 5,
                                "return_chunks": True})
    assert (r.json()["results"][0]["chunks"], r.json()["results"][0]["truncated"]) == (5, True)
    half = documents_of_length(tokenizer, [8000], seed=4)[0]
    r = api.post("/v1/rerank", {"query": "needle", "documents": [half], "chunking": True, "return_chunks": True})
    assert 10 <= r.json()["results"][0]["chunks"] < 32 and r.json()["results"][0]["truncated"] is False


@pytest.mark.stack
def test_chunking_over_http_equals_the_in_process_maximum(api, engine, long_doc):
    body = {"query": "queue", "documents": [long_doc], "chunking": {"overlap": 8, "max_chunks": 3},
            "raw_scores": True, "return_chunks": True}
    (result,) = api.post("/v1/rerank", body).json()["results"]
    scores = engine.score("queue", [long_doc], DocumentPolicy(chunk_overlap=8, max_chunks=3))
    best, chunks = scores.logits, scores.chunks
    assert result["chunks"] == chunks[0] == 3
    assert abs(result["relevance_score"] - best[0]) < 1e-5


@pytest.mark.stack
def test_tei_rerank_answers_a_bare_sorted_array(api):
    body = {"query": "what is deep learning", "texts": ["Deep learning is ...", "cheese", "天气"], "return_text": True}
    r = api.post("/rerank", body)
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert isinstance(ranks, list) and sorted(x["index"] for x in ranks) == [0, 1, 2]
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    assert all(x["text"] == body["texts"][x["index"]] for x in ranks)
    raw = api.post("/rerank", {**body, "raw_scores": True, "return_text": False}).json()
    by_index = {x["index"]: x["score"] for x in ranks}
    assert all("text" not in x and abs(1 / (1 + math.exp(-x["score"])) - by_index[x["index"]]) < 1e-6 for x in raw)


@pytest.mark.stack
def test_tei_truncate_false_refuses_a_text_that_does_not_fit_with_413(api, tokenizer):
    """(TEI's other statuses and its error shape: tests/test_requests.py.)"""
    long_text = documents_of_length(tokenizer, [900])[0]
    r = api.post("/rerank", {"query": "q", "texts": [long_text], "truncate": False})
    assert (r.status_code, r.json().get("error_type")) == (413, "Validation"), r.text
    assert set(r.json()) - {"fields"} == {"error", "error_type", "detail"}
    assert api.post("/rerank", {"query": "q", "texts": [long_text], "truncate": True}).status_code == 200


@pytest.mark.stack
def test_tei_info_is_public_and_describes_a_reranker(api):
    r = requests.get(api.url + "/info", timeout=5)
    assert r.status_code == 200
    info = r.json()
    assert "reranker" in info["model_type"] and info["max_input_length"] == 512
    assert info["max_client_batch_size"] == 64


@pytest.mark.stack
def test_concurrent_chunked_and_plain_calls_keep_their_own_results(api, long_doc):
    outcomes = {}

    def call(name, body):
        outcomes[name] = api.post("/v1/rerank", body).json()

    plain = {"query": "q", "documents": [long_doc, "x"], "raw_scores": True}
    chunked = {**plain, "chunking": True, "return_chunks": True}
    threads = [threading.Thread(target=call, args=(f"{kind}{i}", body))
               for i in range(4) for kind, body in (("plain", plain), ("chunked", chunked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = {k: {x["index"]: x["relevance_score"] for x in v["results"]} for k, v in outcomes.items()}
    for i in range(4):
        assert first[f"plain{i}"] == pytest.approx(first["plain0"], abs=1e-5)
        assert first[f"chunked{i}"] == pytest.approx(first["chunked0"], abs=1e-5)
    assert first["chunked0"][0] >= first["plain0"][0] - 1e-5  # the best window beats or equals the first
