"""The same options give the same scores on every route, synchronous or not (real stack).

Every route resolves its body into one ScoreOptions (shared/schemas.py) that the realtime task
and the stored job carry alike, so /v1/rerank, /v2/rerank, /rerank (both bodies), /score, a
`Prefer: respond-async` call and a bulk job (JSON body or JSON Lines upload) must agree. vLLM's
`use_activation: false` once gave logits on a normal call and sigmoid scores on the async path.
"""

from __future__ import annotations

import pytest
import redis

from rerank.random_model import documents_of_length
from tests.test_jobs import as_query, jsonl, results, wait_finished

pytestmark = pytest.mark.stack

QUERY = "which passage talks about the queue"

#: Options and the routes that take them (a route's wire format may have no name for one).
CASES = {
    "default": ({}, {"v1", "v2", "rerank", "tei", "score", "async", "job", "upload"}),
    "raw_scores": ({"raw_scores": True}, {"v1", "v2", "rerank", "tei", "score", "async", "job", "upload"}),
    "use_activation_false": ({"use_activation": False}, {"v1", "v2", "rerank", "score", "async", "job", "upload"}),
    "left_cut": ({"truncation_direction": "left", "raw_scores": True},
                 {"v1", "v2", "rerank", "tei", "async", "job", "upload"}),
    "chunked": ({"chunking": {"overlap": 16, "max_chunks": 4}, "return_chunks": True},
                {"v1", "v2", "rerank", "async", "job", "upload"}),
    "doc_cap": ({"max_tokens_per_doc": 40, "use_activation": False}, {"v1", "v2", "rerank", "async", "job", "upload"}),
}


@pytest.fixture(scope="module")
def docs(tokenizer) -> list[str]:
    return documents_of_length(tokenizer, [5, 60, 300, 700, 1200, 30], seed=8)


def _ranked(body: dict) -> dict[int, tuple]:
    return {r["index"]: (r["relevance_score"], r.get("chunks"), r.get("truncated")) for r in body["results"]}


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def _job(api, docs, options, route):
    if route == "async":
        r = api.post("/v1/rerank", {"query": QUERY, "documents": docs, **options}, headers={"Prefer": "respond-async"})
    elif route == "job":
        r = api.post("/v1/rerank/jobs", {"items": [{"query": QUERY, "documents": docs}], **options})
    else:
        r = api.post(f"/v1/rerank/jobs?{as_query(options)}", data=jsonl([{"query": QUERY, "documents": docs}]),
                     headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 202, r.text
    final, _ = wait_finished(api, r.json()["id"])
    assert final["status"] == "succeeded", final
    (line,), _ = results(api, r.json()["id"])
    return line


def scores_on(api, route: str, docs: list[str], options: dict) -> dict[int, tuple]:
    """{document index: (score, chunks, truncated)} as `route` answers `options`."""
    body = {"query": QUERY, "documents": docs, **options}
    if route == "v1":
        return _ranked(_ok(api.post("/v1/rerank", body)))
    if route == "v2":
        return _ranked(_ok(api.post("/v2/rerank", body)))
    if route == "rerank":
        return _ranked(_ok(api.post("/rerank", body)))
    if route == "tei":
        tei = {"query": QUERY, "texts": docs, **options}
        return {r["index"]: (r["score"], None, None) for r in _ok(api.post("/rerank", tei))}
    if route == "score":
        data = _ok(api.post("/score", {"text_1": QUERY, "text_2": docs, **options}))["data"]
        return {d["index"]: (d["score"], None, None) for d in data}
    return _ranked(_job(api, docs, options, route))


@pytest.mark.parametrize("case", CASES)
def test_every_route_sync_or_async_gives_the_same_scores(api, docs, case):
    options, routes = CASES[case]
    reference = scores_on(api, "v1", docs, options)
    raw = options.get("raw_scores") or options.get("use_activation") is False
    if raw:
        assert any(not 0 <= s <= 1 for s, _, _ in reference.values()), "logits, not sigmoid scores"
    else:
        assert all(0 < s < 1 for s, _, _ in reference.values())
    for route in sorted(routes - {"v1"}):
        got = scores_on(api, route, docs, options)
        assert got.keys() == reference.keys(), route
        for i, (score, chunks, truncated) in reference.items():
            assert abs(got[i][0] - score) < 1e-5, (route, i, got[i], score)
            if route not in ("tei", "score"):
                assert (got[i][1], got[i][2]) == (chunks, truncated), (route, i)
    if options.get("return_chunks"):
        assert max(chunks for _, chunks, _ in reference.values()) > 1, "some document was cut into windows"


def test_an_instruction_to_a_cross_encoder_is_a_clear_422(api, redis_url):
    """The tests' XLM-R cross-encoder takes no instruction: every route that takes the field says
    so (422, field `instruction`), and the worker lives on."""
    body = {"query": QUERY, "documents": ["a", "b"], "instruction": "Given a web search query, retrieve passages"}
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        r = api.post(path, body)
        assert r.status_code == 422, (path, r.text)
        error = r.json()
        assert error["error_type"] == "validation" and "instruction" in error["error"], (path, error)
        assert error["fields"] == [{"field": "instruction", "message": error["error"]}], (path, error)
    # A job is refused at creation when the workers' heartbeats say their model takes none; from
    # a worker that does not say, it runs and each item reports the refusal.
    from shared.workers import WorkerRegistry

    flags = [w.get("instruction") for w in WorkerRegistry(redis.Redis.from_url(redis_url)).alive("tiny", fresh=True)]
    for headers, request in (({"Prefer": "respond-async"}, ("/v1/rerank", body)),
                             ({}, ("/v1/rerank/jobs", {"items": [{"query": QUERY, "documents": ["a"]}],
                                                       "instruction": body["instruction"]}))):
        r = api.post(*request, headers=headers)
        if all(flag is False for flag in flags):
            assert r.status_code == 422 and r.json()["fields"][0]["field"] == "instruction", r.text
        else:
            assert r.status_code == 202, r.text
            final, _ = wait_finished(api, r.json()["id"])
            (line,), _ = results(api, r.json()["id"])
            assert final["errors"]["count"] == 1 and "instruction" in line["error"], (final, line)
    assert api.post("/v1/rerank", {"query": QUERY, "documents": ["a"]}).status_code == 200
