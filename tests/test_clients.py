"""Every common rerank client, pointed at the real stack (gunicorn -> Redis -> Celery worker, tiny model).

Where a client is a small library that installs cleanly it is called for real (the Cohere SDK, v1
and v2). Where it is not (FastGPT is TypeScript; Dify, LangChain, LlamaIndex and litellm bring
hundreds of packages), the test replays exactly what its source sends and reads: the request URL
and body, and the parsing of the answer, copied from the file cited above each replay. Each test
here is named in docs/api.md's table of clients.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import requests

from tests.conftest import TOKENS

pytestmark = pytest.mark.stack

AUTH = {"Authorization": f"Bearer {TOKENS[0]}"}
QUERY = "what is a panda?"
DOCS = [
    "hi",
    "The giant panda is a bear species endemic to China.",
    "熊猫是中国特有的熊科动物",
    "Redis is an in-memory data store used as a queue here.",
    "",
]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def reference(api) -> dict[int, float]:
    """Scores of DOCS for QUERY through FastGPT's own route, to compare every other route with."""
    r = api.post("/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    return {x["index"]: x["relevance_score"] for x in r.json()["results"]}


def assert_same_ranking(pairs: list[tuple[int, float]], reference: dict[int, float],
                        n: int | None = None) -> None:
    """(index, score) pairs in answer order: the reference's best `n`, the same scores, high to low."""
    best = sorted(reference, key=lambda i: (-reference[i], i))[: n or len(reference)]
    assert [i for i, _ in pairs] == best
    assert all(abs(score - reference[i]) < 1e-6 for i, score in pairs)


# --- Cohere SDK (real library) ----------------------------------------------------------------------


def test_cohere_sdk_v1(api, reference):
    import cohere

    co = cohere.Client(api_key=TOKENS[0], base_url=api.url, timeout=30)
    answer = co.rerank(model="bge-reranker-base", query=QUERY, documents=[{"text": d} for d in DOCS], top_n=3,
                       return_documents=True)
    assert_same_ranking([(r.index, r.relevance_score) for r in answer.results], reference, 3)
    assert all(r.document.text == DOCS[r.index] for r in answer.results)
    assert answer.meta.tokens.input_tokens > 0
    with pytest.raises(cohere.errors.UnauthorizedError) as caught:
        cohere.Client(api_key="wrong", base_url=api.url).rerank(model="m", query=QUERY, documents=DOCS)
    assert caught.value.body["detail"] == caught.value.body["error"]


def test_cohere_sdk_v2(api, reference):
    """ClientV2 is what langchain-cohere, LlamaIndex's CohereRerank and litellm's cohere/ call."""
    import cohere

    co = cohere.ClientV2(api_key=TOKENS[0], base_url=api.url, timeout=30)
    answer = co.rerank(model="bge-reranker-base", query=QUERY, documents=DOCS, top_n=4, max_tokens_per_doc=256,
                       priority=0)
    assert_same_ranking([(r.index, r.relevance_score) for r in answer.results], reference, 4)
    assert answer.meta.api_version.version == "2" and answer.meta.tokens.input_tokens > 0
    assert answer.id and answer.model == "tiny"  # our extras, kept by the SDK's lenient models
    everything = co.rerank(model="m", query=QUERY, documents=DOCS)  # no top_n: all
    assert len(everything.results) == len(DOCS)
    with pytest.raises(cohere.errors.UnprocessableEntityError) as caught:
        co.rerank(model="m", query="", documents=DOCS)
    assert "query" in caught.value.body["detail"]


# --- FastGPT (TypeScript: replay) ---------------------------------------------------------------------


def fastgpt_rerank_recall(base_url: str, request_url: str | None, token: str, query: str, documents: list[str],
                          default_config: dict | None = None) -> tuple[list[tuple[int, float]], int]:
    """FastGPT's reRankRecall (labring/FastGPT packages/service/core/ai/rerank/index.ts): POST to the
    model's requestUrl, else `${baseUrl}/rerank`; `{model, query, documents, ...defaultConfig}`;
    empty `results` means "no rerank"; reads results[].index (into its own document list) and
    relevance_score, in the order given (it trusts high-to-low); inputTokens from
    meta.tokens.input_tokens."""
    url = request_url or f"{base_url}/rerank"
    body = {"model": "bge-reranker-base", "query": query, "documents": documents, **(default_config or {})}
    data = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    data.raise_for_status()  # axios rejects a non-2xx: FastGPT then searches without rerank
    data = data.json()
    if not data.get("results"):
        return [], 0
    results = []
    for item in data["results"]:
        documents[item["index"]]  # `expandedDocuments[item.index].id`: an index out of range throws
        results.append((item["index"], item["relevance_score"]))
    return results, data["meta"]["tokens"]["input_tokens"]


def test_fastgpt_replay(api, reference):
    for base_url, request_url in [(api.url, f"{api.url}/v1/rerank"),  # the URL FastGPT's docs tell users to set
                                  (f"{api.url}/v1", None),  # no requestUrl, AI proxy base URL with /v1
                                  (api.url, None)]:  # no requestUrl, base URL without /v1: POST /rerank
        results, tokens = fastgpt_rerank_recall(base_url, request_url, TOKENS[0], QUERY, DOCS)
        assert_same_ranking(results, reference)
        assert tokens > 0 and all(0 <= s <= 1 for _, s in results)
    results, _ = fastgpt_rerank_recall(api.url, None, TOKENS[0], QUERY, DOCS, default_config={"top_n": 2})
    assert_same_ranking(results, reference, 2)
    # The model test button.
    results, _ = fastgpt_rerank_recall(api.url, f"{api.url}/v1/rerank", TOKENS[0], "Hi", ["Hi"])
    assert len(results) == 1 and results[0][0] == 0


# --- Dify (replays of its plugins) -------------------------------------------------------------------


def test_dify_tei_replay(api, reference):
    """Dify's TEI provider (langgenius/dify api/core/model_runtime/model_providers/huggingface_tei/
    tei_helper.py and rerank/rerank.py; the plugin in langgenius/dify-official-plugins
    models/huggingface_tei adds the Authorization header): GET {server_url}/info, read model_type's
    first key and max_input_length; then POST {server_url}/rerank {query, texts, return_text: true},
    read index, text and score of each entry, in the order given, filter by score_threshold."""
    headers = {"Content-Type": "application/json", **AUTH}
    info = requests.get(f"{api.url}/info", headers=headers, timeout=10)
    assert info.status_code == 200
    info = info.json()
    assert list(info["model_type"].keys())[0] == "reranker"  # noqa: RUF015 - as Dify's source reads it
    assert info.get("max_input_length", 512) == 512 and info.get("max_client_batch_size", 1) == 64
    response = requests.post(f"{api.url}/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True},
                             headers=headers, timeout=60)
    response.raise_for_status()
    docs = [(r["index"], r["text"], r["score"]) for r in response.json()]
    assert_same_ranking([(i, s) for i, _, s in docs], reference)
    assert all(text == DOCS[i] for i, text, _ in docs)
    threshold = sorted(reference.values())[-2]
    assert [i for i, _, s in docs if s >= threshold] == sorted(reference, key=lambda i: -reference[i])[:2]


def dify_openai_compatible(endpoint_url: str, api_key: str, query: str, docs: list[str],
                           top_n: int | None) -> list[tuple[int, str, float]]:
    """Dify's openai_api_compatible rerank (langgenius/dify-plugin-sdks
    python/dify_plugin/interfaces/model/openai_compatible/rerank.py): POST `URL(endpoint_url) /
    "rerank"` with `{model, query, documents, top_n, return_documents: true}` (top_n may be None or
    0); read results[].relevance_score, min-max normalize them, take the text from document.text."""
    data = {"model": "bge-reranker-base", "query": query, "documents": docs, "top_n": top_n,
            "return_documents": True}
    response = requests.post(endpoint_url.rstrip("/") + "/rerank", data=json.dumps(data), timeout=60,
                             headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    response.raise_for_status()
    results = response.json()
    scores = [result["relevance_score"] for result in results["results"]]
    if len(scores) == 1:
        scores.append(0)
    low, high = min(scores), max(scores)
    span = high - low if high != low else 1.0
    out = []
    for result in results["results"]:
        index = result["index"]
        document = result.get("document", {})
        text = document.get("text", docs[index]) if isinstance(document, dict) else document or docs[index]
        out.append((index, text, (result["relevance_score"] - low) / span))
    return sorted(out, key=lambda d: d[2], reverse=True)


def test_dify_openai_compatible_replay(api, reference):
    best = sorted(reference, key=lambda i: (-reference[i], i))
    for endpoint in (f"{api.url}/v1", api.url):  # -> /v1/rerank, and /rerank with the Cohere body
        for top_n, expected in ((None, len(DOCS)), (0, len(DOCS)), (len(DOCS), len(DOCS)), (2, 2)):
            docs = dify_openai_compatible(endpoint, TOKENS[0], QUERY, DOCS, top_n)
            assert [i for i, _, _ in docs] == best[:expected], (endpoint, top_n)
            assert all(text == DOCS[i] for i, text, _ in docs)
            assert docs[0][2] == 1.0


# --- LangChain / LlamaIndex JinaRerank (replays): errors must carry `detail` ---------------------------


def jina_rerank(url: str, api_key: str, query: str, documents: list, top_n: int | None) -> list[dict]:
    """LangChain's JinaRerank.rerank (langchain-ai/langchain libs/community/langchain_community/
    document_compressors/jina_rerank.py) and LlamaIndex's JinaRerank._postprocess_nodes
    (run-llama/llama_index llama-index-integrations/postprocessor/llama-index-postprocessor-jinaai-
    rerank/llama_index/postprocessor/jinaai_rerank/base.py) do the same: post `{query, documents,
    model, top_n}`, take `.json()` whatever the status, and `raise RuntimeError(resp["detail"])` when
    there is no `results`."""
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {api_key}", "Accept-Encoding": "identity",
                            "Content-type": "application/json", "user-agent": "langchain"})
    resp = session.post(url, json={"query": query, "documents": documents, "model": "jina-reranker-v1-base-en",
                                   "top_n": top_n}, timeout=30).json()
    if "results" not in resp:
        raise RuntimeError(resp["detail"])
    return [{"index": res["index"], "relevance_score": res["relevance_score"]} for res in resp["results"]]


def test_jina_clients_replay_and_their_error_detail(api, reference):
    url = f"{api.url}/v1/rerank"
    results = jina_rerank(url, TOKENS[0], QUERY, DOCS, 3)
    assert_same_ranking([(r["index"], r["relevance_score"]) for r in results], reference, 3)
    assert len(jina_rerank(url, TOKENS[0], QUERY, DOCS, None)) == len(DOCS)
    failures = {
        "missing or invalid bearer token": (url, "wrong-token", QUERY, DOCS),
        "query": (url, TOKENS[0], "", DOCS),
        "MAX_DOCUMENTS": (url, TOKENS[0], QUERY, ["d"] * 65),
        "documents.1": (url, TOKENS[0], QUERY, ["a", 5]),
        "not found": (f"{api.url}/v1/no-such-route", TOKENS[0], QUERY, DOCS),
    }
    for words, args in failures.items():
        with pytest.raises(RuntimeError, match=re.escape(words)):
            jina_rerank(*args, top_n=3)


# --- litellm's hosted_vllm/ and infinity/ providers (replays) -----------------------------------------


def litellm_cohere_style_body(query: str, documents: list, top_n: int | None) -> dict:
    """litellm's RerankRequest(...).model_dump(exclude_none=True) (BerriAI/litellm litellm/types/
    rerank.py), as both providers' transform_rerank_request build it; return_documents defaults to
    True in their map_cohere_rerank_params."""
    body = {"model": "bge-reranker-base", "query": query, "top_n": top_n, "documents": documents,
            "rank_fields": None, "return_documents": True, "max_chunks_per_doc": None,
            "max_tokens_per_doc": None, "instruction": None, "truncate_prompt_tokens": None,
            "truncation_side": None, "max_tokens_per_query": None}
    return {k: v for k, v in body.items() if v is not None}


def hosted_vllm_url(api_base: str) -> str:
    """HostedVLLMRerankConfig.get_complete_url (litellm/llms/hosted_vllm/rerank/transformation.py)."""
    api_base = api_base.rstrip("/")
    if api_base.endswith("/v1/rerank"):
        api_base = api_base.replace("/v1/rerank", "/rerank")
    elif not api_base.endswith("/rerank"):
        api_base = f"{api_base}/rerank"
    return api_base


def test_litellm_hosted_vllm_replay(api, reference):
    for api_base in (api.url, f"{api.url}/v1", f"{api.url}/v1/rerank"):
        response = requests.post(hosted_vllm_url(api_base), json=litellm_cohere_style_body(QUERY, DOCS, 3),
                                 headers={**AUTH, "accept": "application/json"}, timeout=30)
        assert response.status_code == 200, (api_base, response.text)
        # HostedVLLMRerankConfig._transform_response: meta.billed_units / meta.tokens, else usage.
        data = response.json()
        meta = data.get("meta")
        meta_tokens = meta.get("tokens") if isinstance(meta, dict) else None
        usage_total = data.get("usage", {}).get("total_tokens", 0)
        input_tokens = meta_tokens.get("input_tokens") if isinstance(meta_tokens, dict) else usage_total
        assert input_tokens > 0
        results = data.get("results")
        assert results is not None and all("index" in r and "relevance_score" in r for r in results)
        assert_same_ranking([(int(r["index"]), float(r["relevance_score"])) for r in results], reference, 3)
        assert all(str(r.get("document", {}).get("text", "")) == DOCS[r["index"]] for r in results)


def test_litellm_infinity_replay(api, reference):
    # InfinityRerankConfig.get_complete_url (litellm/llms/infinity/rerank/transformation.py).
    url = api.url.rstrip("/")
    url = url if url.endswith("/rerank") else f"{url}/rerank"
    response = requests.post(url, json=litellm_cohere_style_body(QUERY, DOCS, 2),
                             headers={"Authorization": f"Bearer {TOKENS[0]}", "accept": "application/json",
                                      "content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    # InfinityRerankConfig.transform_rerank_response: tokens from usage.prompt_tokens / total_tokens.
    data = response.json()
    input_tokens = data.get("usage", {}).get("prompt_tokens", 0)
    output_tokens = data.get("usage", {}).get("total_tokens", 0) - input_tokens
    assert input_tokens > 0 and output_tokens == 0
    results = [(r.get("index"), r.get("relevance_score")) for r in data.get("results")]
    assert_same_ranking(results, reference, 2)


# --- vLLM's own bodies --------------------------------------------------------------------------------


def test_vllm_rerank_body_on_every_route(api, reference):
    """vLLM's RerankRequest (vllm-project/vllm vllm/entrypoints/pooling/score/protocol.py): top_n
    defaults to 0 = all, plus fields we ignore; vLLM serves it on /rerank, /v1/rerank, /v2/rerank."""
    body = {"model": "BAAI/bge-reranker-base", "query": QUERY, "documents": DOCS, "top_n": 0,
            "truncate_prompt_tokens": None, "priority": 0, "use_activation": None}
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = api.post(path, body)
        assert r.status_code == 200, (path, r.text)
        data = r.json()  # vLLM's RerankResponse: id, model, usage.total_tokens, results
        assert data["id"] and data["model"] == "tiny" and data["usage"]["total_tokens"] > 0
        assert_same_ranking([(x["index"], x["relevance_score"]) for x in data["results"]], reference)
    raw = api.post("/rerank", {**body, "use_activation": False}).json()
    assert all(abs(sigmoid(x["relevance_score"]) - reference[x["index"]]) < 1e-6 for x in raw["results"])


def test_vllm_score_replay(api, reference):
    """vLLM's score API (vllm/entrypoints/pooling/score/protocol.py: ScoreTextRequest text_1/text_2,
    ScoreQueriesDocumentsRequest queries/documents; pairing in score/utils.py
    _validate_score_input_lens: 1:1, 1:N or N:N), answered as its ScoreResponse."""
    r = api.post("/score", {"model": "BAAI/bge-reranker-base", "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "list" and data["model"] == "tiny" and data["id"]
    assert isinstance(data["created"], int)
    assert [d["index"] for d in data["data"]] == list(range(len(DOCS)))  # input order, not sorted
    assert all(d["object"] == "score" for d in data["data"])
    assert all(abs(d["score"] - reference[d["index"]]) < 1e-6 for d in data["data"])
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0
    assert data["usage"]["completion_tokens"] == 0

    same = api.post("/v1/score", {"queries": [QUERY], "documents": DOCS}).json()
    assert [d["score"] for d in same["data"]] == [d["score"] for d in data["data"]]
    one = api.post("/score", {"text_1": QUERY, "text_2": DOCS[1]}).json()
    assert len(one["data"]) == 1 and abs(one["data"][0]["score"] - reference[1]) < 1e-6

    # N:N: each pair its own query; the same pair scores as in a 1:N call.
    other = "where does Redis keep its data?"
    pairs = api.post("/score", {"text_1": [QUERY, other, QUERY], "text_2": [DOCS[1], DOCS[3], DOCS[2]]}).json()
    alone = api.post("/score", {"text_1": other, "text_2": [DOCS[3]]}).json()["data"][0]["score"]
    assert [round(d["score"], 6) for d in pairs["data"]] == [round(reference[1], 6), round(alone, 6),
                                                              round(reference[2], 6)]
    raw = api.post("/score", {"text_1": QUERY, "text_2": DOCS, "use_activation": False}).json()
    assert all(abs(sigmoid(d["score"]) - reference[d["index"]]) < 1e-6 for d in raw["data"])

    for bad, words in [({"text_1": [QUERY, other], "text_2": DOCS}, "1:1, 1:N or N:N"),
                       ({"text_1": [QUERY, other], "text_2": DOCS[0]}, "1:1, 1:N or N:N"),
                       ({"text_1": QUERY, "text_2": []}, "at least one"),
                       ({"text_1": QUERY}, "both required"),
                       ({"text_1": QUERY, "documents": DOCS}, "or queries and documents"),
                       ({"text_1": QUERY, "text_2": [5]}, "text_2")]:
        r = api.post("/score", bad)
        assert r.status_code == 422 and words in r.json()["detail"], (bad, r.text)
    r = api.post("/score", {"text_1": QUERY, "text_2": ["d"] * 65})
    assert r.status_code == 413 and "MAX_DOCUMENTS" in r.json()["detail"]


# --- the service's side of the contract -------------------------------------------------------------


def test_rerank_takes_either_body(api, reference):
    cohere_style = api.post("/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True})
    assert cohere_style.status_code == 200, cohere_style.text
    body = cohere_style.json()
    assert list(body) == ["id", "model", "results", "meta", "usage"]
    assert_same_ranking([(x["index"], x["relevance_score"]) for x in body["results"]], reference, 2)
    assert all(x["document"]["text"] == DOCS[x["index"]] for x in body["results"])
    tei_style = api.post("/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert isinstance(tei_style, list) and all("text" not in x for x in tei_style)
    assert_same_ranking([(x["index"], x["score"]) for x in tei_style], reference)
    # Both bodies or neither, and a Cohere body's own errors: tests/test_requests.py.


def test_top_n_zero_or_null_means_all(api):
    for top_n in (0, None):
        for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
            r = api.post(path, {"query": QUERY, "documents": DOCS, "top_n": top_n})
            assert r.status_code == 200 and len(r.json()["results"]) == len(DOCS), (path, top_n, r.text)
    r = api.post("/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1})
    assert r.status_code == 422 and "top_n" in r.json()["detail"]


def test_model_lookup_by_id(api, redis_url):
    r = requests.get(api.url + "/v1/models/tiny", headers=AUTH, timeout=5)
    assert r.status_code == 200, r.text
    card = r.json()
    listed = requests.get(api.url + "/v1/models", headers=AUTH, timeout=5).json()["data"][0]
    assert card["id"] == "tiny" and card["object"] == "model" and card["workers"] >= 1
    # The engines those workers feed: each with its pid, memory and how many feed it.
    assert card["engines"] and sum(e["feeders"] for e in card["engines"]) == card["workers"]
    assert all(e["pid"] and e["memory_mib"] > 0 for e in card["engines"])
    ready = requests.get(api.url + "/ready", timeout=5).json()["models"]["tiny"]
    assert ready == {"workers": card["workers"], "engines": len(card["engines"])}
    assert {k: v for k, v in card.items() if k != "pairs_per_second"} == {
        k: v for k, v in listed.items() if k != "pairs_per_second"}
    r = requests.get(api.url + "/v1/models/bge-reranker-large", headers=AUTH, timeout=5)
    assert r.status_code == 404 and "tiny" in r.json()["detail"]
    # By Hugging Face id, slash included.
    from api.app import create_app
    from shared.settings import Settings

    client = create_app(Settings(models="bge-reranker-base", redis_url=redis_url)).test_client()
    by_hf_id = client.get("/v1/models/BAAI/bge-reranker-base")
    assert by_hf_id.status_code == 200 and by_hf_id.get_json()["id"] == "bge-reranker-base"
    assert by_hf_id.get_json()["source"] == "BAAI/bge-reranker-base"


def test_metrics_content_type_is_prometheus_clients_once(api):
    from prometheus_client import CONTENT_TYPE_LATEST
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(api.url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert r.headers["Content-Type"].count("charset") == 1  # Prometheus 3 refuses a repeated parameter
    names = {family.name for family in text_string_to_metric_families(r.text)}
    assert "rerank_http_requests" in names and "rerank_workers" in names


# Field order of the answers, every error body, the docs page, the OpenAPI document's routes and
# auth, and request ids: tests/test_requests.py (the API decides them alone).
