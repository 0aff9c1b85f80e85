"""A Qwen3-Reranker folder through the running stack: gunicorn -> Redis -> a Celery worker whose
engine loads the folder (MODELS=name=/folder, no other option), scored as the model card scores.

FastGPT's call, Cohere v2, vLLM's /score, a bulk job and a chunked long document; /v1/models and
/info say the family and the context length.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import requests

from rerank.random_model import sentence
from tests.conftest import TOKENS, Stack
from tests.procs import base_env, start_api, start_worker
from tests.test_families import TOLERANCE, Qwen3Card
from tests.test_jobs import results, submit, wait_finished

pytestmark = pytest.mark.stack

QUERY = "which worker holds the batch memory?"
DOCS = ["The worker holds the batch in memory.", "hi", "yes", sentence(random.Random(5), 60), ""]


@pytest.fixture(scope="module")
def qwen3_stack(qwen3_dir, redis_url, log_dir):
    env = base_env(REDIS_URL=redis_url, MODELS=f"qwen3rr={qwen3_dir}", ACCESS_TOKEN=",".join(TOKENS),
                   DTYPE="float32",  # the reference path the model card is compared with
                   SYNC_TIMEOUT="20", MAX_DOCUMENTS="64", MAX_REQUEST_BYTES="262144", HEARTBEAT_INTERVAL="0.5",
                   WORKER_CONCURRENCY="4", MAX_CHUNKS="8", TORCH_THREADS="1", LOG_LEVEL="INFO")
    worker = start_worker("worker-qwen3", env, log_dir, "qwen3rr")
    api, url = start_api("api-qwen3", env, log_dir)
    with requests.Session() as session:
        yield Stack(url, env, api, session)
    api.stop()
    worker.stop()


@pytest.fixture(scope="module")
def card(qwen3_dir):
    return Qwen3Card(qwen3_dir)


def relevance(card: Qwen3Card, query: str, docs: list[str], **kwargs) -> np.ndarray:
    return np.asarray([card.score(card.ids(query, d, **kwargs))[1] for d in docs])


def by_index(results_list) -> np.ndarray:
    out = np.zeros(len(results_list))
    for r in results_list:
        out[r["index"]] = r["relevance_score"]
    return out


def test_fastgpt_call_scores_as_the_model_card(qwen3_stack, card):
    r = qwen3_stack.post("/v1/rerank", {"model": "qwen3-reranker", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert np.abs(by_index(body["results"]) - relevance(card, QUERY, DOCS)).max() < TOLERANCE


def test_cohere_v2_and_vllm_score(qwen3_stack, card):
    expected = relevance(card, QUERY, DOCS)
    v2 = qwen3_stack.post("/v2/rerank", {"model": "qwen3rr", "query": QUERY, "documents": DOCS, "top_n": 3})
    assert v2.status_code == 200, v2.text
    top = v2.json()["results"]
    assert [x["index"] for x in top] == list(np.argsort(-expected, kind="stable")[:3])
    assert np.abs(np.asarray([x["relevance_score"] for x in top]) - expected[[x["index"] for x in top]]).max() < TOLERANCE
    scored = qwen3_stack.post("/score", {"model": "qwen3rr", "text_1": QUERY, "text_2": DOCS})
    assert scored.status_code == 200, scored.text
    assert np.abs(np.asarray([d["score"] for d in scored.json()["data"]]) - expected).max() < TOLERANCE
    raw = qwen3_stack.post("/score", {"text_1": QUERY, "text_2": DOCS[:2], "use_activation": False}).json()
    assert np.abs(np.asarray([d["score"] for d in raw["data"]])
                  - [card.score(card.ids(QUERY, d))[0] for d in DOCS[:2]]).max() < TOLERANCE  # yes - no


def test_bulk_job_on_qwen3(qwen3_stack, card):
    rng = random.Random(11)
    items = [{"id": f"i{k}", "query": sentence(rng, 4), "documents": [sentence(rng, rng.randint(1, 30)) for _ in range(3)]}
             for k in range(4)]
    job = submit(qwen3_stack, items)
    final, _ = wait_finished(qwen3_stack, job)
    assert final["status"] == "succeeded", final
    lines, _ = results(qwen3_stack, job)
    got = {line["id"]: by_index(line["results"]) for line in lines}
    for item in items:
        assert np.abs(got[item["id"]] - relevance(card, item["query"], item["documents"])).max() < TOLERANCE


def test_chunked_long_document_scores_its_best_window(qwen3_stack, qwen3_dir, card):
    from engine import DocumentPolicy, Engine, EngineConfig

    long_doc = " ".join(sentence(random.Random(k), 200) for k in range(40))
    assert len(card.tok(long_doc)["input_ids"]) > 9000  # more than the 8192 of one pair: windows
    body = {"query": QUERY, "documents": ["short", long_doc], "chunking": {"overlap": 16}, "return_chunks": True}
    r = qwen3_stack.post("/v1/rerank", body)
    assert r.status_code == 200, r.text
    res = {x["index"]: x for x in r.json()["results"]}
    assert res[0]["chunks"] == 1 and res[1]["chunks"] >= 2
    local = Engine.start(EngineConfig(source=str(qwen3_dir), device="cpu", dtype="float32"))
    try:
        expected = local.score_pairs([(QUERY, "short")])[0]
        best = local.score(QUERY, [long_doc], DocumentPolicy(chunk_overlap=16, max_chunks=8)).logits[0]
    finally:
        local.stop()
    assert abs(res[0]["relevance_score"] - expected) < TOLERANCE
    assert abs(res[1]["relevance_score"] - 1 / (1 + np.exp(-best))) < TOLERANCE


def test_models_and_info_say_family_and_context_length(qwen3_stack):
    card = qwen3_stack.session.get(qwen3_stack.url + "/v1/models", headers={"Authorization": f"Bearer {TOKENS[0]}"},
                                   timeout=10).json()["data"][0]
    assert (card["family"], card["context_length"], card["max_length"]) == ("qwen3", 8192, 8192)
    info = qwen3_stack.session.get(qwen3_stack.url + "/info", headers={"Authorization": f"Bearer {TOKENS[0]}"},
                                   timeout=10).json()
    assert (info["family"], info["context_length"], info["max_input_length"]) == ("qwen3", 8192, 8192)


def test_qwen3_instruction_through_api(qwen3_stack, card):
    """Needs issue 23's plumbing of the `instruction` field (API -> worker -> Encoder.encode):
    fails until it merges."""
    instruction = "Given a question, find the passage that answers it"
    r = qwen3_stack.post("/v1/rerank", {"query": QUERY, "documents": DOCS, "instruction": instruction})
    assert r.status_code == 200, r.text
    expected = relevance(card, QUERY, DOCS, instruction=instruction)
    assert np.abs(by_index(r.json()["results"]) - expected).max() < TOLERANCE
