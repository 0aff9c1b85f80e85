"""`POST /v1/rerank` over HTTP against the real stack: gunicorn -> Redis -> Celery worker."""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from rerank.random_model import documents_of_length, sentence
from tests.conftest import TOKENS

pytestmark = pytest.mark.stack


def scores_by_index(body) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in body["results"]}


def assert_ranked(body, n: int) -> None:
    results = body["results"]
    indexes = [r["index"] for r in results]
    assert sorted(indexes) == sorted(set(indexes)) and all(0 <= i < n for i in indexes)
    keys = [(-r["relevance_score"], r["index"]) for r in results]
    assert keys == sorted(keys), "results must be sorted high to low, ties in input order"


def test_fastgpt_exact_body(api):
    docs = ["FastGPT 是一个知识库问答系统\nIt answers from documents", "天气很好", "Redis is a queue here", ""]
    r = api.post("/v1/rerank", {"model": "bge-reranker-base", "query": "什么是 FastGPT?", "documents": docs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == len(docs)
    assert_ranked(body, len(docs))
    assert all(0.0 <= x["relevance_score"] <= 1.0 for x in body["results"])
    assert body["meta"]["tokens"]["input_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["meta"]["tokens"]["input_tokens"]
    assert r.headers["X-Request-Id"] == body["id"]


def test_fastgpt_model_test_call(api):
    r = api.post("/v1/rerank", {"query": "Hi", "documents": ["Hi"]})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["index"] == 0 and 0 < result["relevance_score"] < 1


def test_scores_equal_cross_encoder(api, model_dir, tokenizer):
    from sentence_transformers import CrossEncoder

    rng = random.Random(11)
    docs = documents_of_length(tokenizer, [rng.randint(0, 350) for _ in range(30)], seed=5)
    query = "redis worker 的 latency"
    expected = CrossEncoder(str(model_dir), device="cpu").predict([(query, d) for d in docs])
    r = api.post("/v1/rerank", {"model": "tiny", "query": query, "documents": docs})
    assert r.status_code == 200, r.text
    got = scores_by_index(r.json())
    assert max(abs(got[i] - float(expected[i])) for i in range(len(docs))) < 1e-5


def test_scores_independent_of_batch_composition(api):
    rng = random.Random(3)
    docs = [sentence(rng, rng.randint(1, 60)) for _ in range(24)]
    query = "which documents mention the queue"
    whole = scores_by_index(api.post("/v1/rerank", {"model": "tiny", "query": query, "documents": docs}).json())

    def one(i):
        body = api.post("/v1/rerank", {"model": "tiny", "query": query, "documents": [docs[i]]}).json()
        return i, body["results"][0]["relevance_score"]

    with ThreadPoolExecutor(8) as pool:  # concurrent calls share forward passes in the worker
        alone = dict(pool.map(one, range(len(docs))))
    assert max(abs(whole[i] - alone[i]) for i in range(len(docs))) < 1e-5


def test_top_n_return_documents_and_object_documents(api):
    docs = [{"text": "alpha"}, "beta", {"text": "γάμμα 伽马"}, {"text": ""}, "delta"]
    r = api.post("/v1/rerank", {"query": "greek letters", "documents": docs, "top_n": 2, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    full = api.post("/v1/rerank", {"query": "greek letters", "documents": docs}).json()
    assert [x["index"] for x in body["results"]] == [x["index"] for x in full["results"]][:2]
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    for x in body["results"]:
        assert x["document"] == {"text": texts[x["index"]]}
    assert all("document" not in x for x in full["results"])
    huge = api.post("/v1/rerank", {"query": "q", "documents": docs, "top_n": 10**9}).json()
    assert len(huge["results"]) == len(docs)


def test_raw_scores_are_logits(api):
    docs = ["one", "two", "three 三"]
    raw = api.post("/v1/rerank", {"query": "count", "documents": docs, "raw_scores": True}).json()
    norm = scores_by_index(api.post("/v1/rerank", {"query": "count", "documents": docs}).json())
    assert_ranked(raw, 3)
    for x in raw["results"]:
        assert abs(1 / (1 + math.exp(-x["relevance_score"])) - norm[x["index"]]) < 1e-9


def test_unicode_and_empty_documents(api):
    docs = ["", "😀🚀 emoji", "مرحبا بالعالم", "\u0000 control \u001f chars", "</s><s> special tokens", " "]
    r = api.post("/v1/rerank", {"query": "你好 👋", "documents": docs, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_ranked(body, len(docs))
    assert {x["index"]: x["document"]["text"] for x in body["results"]} == dict(enumerate(docs))


# --- authentication and invalid requests: tests/test_requests.py (no processes needed) -----------


def test_token_never_logged(api):
    api.post("/v1/rerank", {"query": "q", "documents": ["d"]})
    api.post("/v1/rerank", {"query": "q", "documents": ["d"]}, token="not-the-token")
    log = api.api.log_path.read_text()
    assert TOKENS[0] not in log and TOKENS[1] not in log and "not-the-token" not in log


# --- errors (the ones the API decides alone: tests/test_requests.py) --------------------------------


def test_model_without_worker_is_503_at_once(multi_api):
    r = multi_api.post("/v1/rerank", {"model": "spare", "query": "q", "documents": ["a"]})
    assert r.status_code == 503
    assert "spare" in r.json()["error"]
    assert r.elapsed.total_seconds() < 2
