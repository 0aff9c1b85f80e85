"""What the API decides alone, checked without processes: auth, validation, statuses, error
shapes, and the options each route resolves (tests/fakes.py: the real app, an in-process
dispatcher). What needs Redis, a worker or gunicorn is in the stack tests."""

from __future__ import annotations

import json

import pytest

from shared.schemas import Failure, ScoreOptions, ScoreReply
from tests.fakes import TOKENS, app_with, auth, settings, worker

BODY = {"query": "q", "documents": ["d"]}


@pytest.fixture(scope="module")
def client():
    return app_with()[0]


@pytest.fixture(scope="module")
def protected(client) -> list[tuple[str, str]]:
    """(method, path) of every operation the OpenAPI document marks as needing the token."""
    doc = client.get("/openapi.json").get_json()
    return [(method.upper(), path.replace("{job_id}", "job_" + "0" * 32))
            for path, methods in doc["paths"].items() for method, op in methods.items() if op.get("security")]


def post(client, path, body=None, *, token=TOKENS[0], **kwargs):
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    if body is not None and "data" not in kwargs:
        kwargs["json"] = body
    return client.post(path, headers=headers, **kwargs)


# --- authentication (moved from tests/test_api.py and tests/test_hardening.py) --------------------


@pytest.mark.parametrize(
    "header",
    # (Trailing blanks are not part of a header value (RFC 9110 5.5): HTTP servers strip them.)
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {TOKENS[0]}", f"Bearer  {TOKENS[0]}",
     f"Bearer \t{TOKENS[0]}", f"Bearer\t{TOKENS[0]}", f"{TOKENS[0]}", f"Bearer {TOKENS[0]}x",
     f"Bearer {TOKENS[0][:-1]}", f"Bearer {TOKENS[0]},{TOKENS[1]}", f"Bearer {TOKENS[0]}{TOKENS[1]}",
     f"Bearer{TOKENS[0]}"],
)
def test_bad_or_missing_token_is_401_on_every_protected_route(client, protected, header):
    operations = protected
    assert len(operations) >= 7
    headers = {} if header is None else {"Authorization": header}
    for method, path in operations:
        r = client.open(path, method=method, headers=headers, json={})
        assert r.status_code == 401, (method, path, header, r.status_code)
        assert r.get_json()["error_type"] == "unauthorized"
        assert TOKENS[0] not in r.text and TOKENS[1] not in r.text
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
@pytest.mark.parametrize("token", TOKENS)
def test_every_configured_token_works_in_any_scheme_case(client, scheme, token):
    r = post(client, "/v1/rerank", BODY, token=None, headers={"Authorization": f"{scheme} {token}"})
    assert r.status_code == 200, r.text


def test_open_server_needs_no_token_and_health_is_public(client):
    open_client, _ = app_with(settings(access_token=None))
    assert post(open_client, "/v1/rerank", BODY, token=None).status_code == 200
    assert client.get("/health").status_code == 200


def test_metrics_can_require_the_token():
    """(Moved from tests/test_ops.py.)"""
    locked, _ = app_with(settings(metrics_auth=True))
    assert locked.get("/metrics").status_code == 401
    assert locked.get("/health").status_code == 200


# --- invalid requests (moved from tests/test_api.py) ---------------------------------------------


def test_malformed_json_is_400(client):
    for data in (b"{not json", b"", b'{"query": "q", "documents": ["a"]', b"\xff\xfe{}"):
        r = post(client, "/v1/rerank", data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (data, r.text)
        assert r.get_json()["error_type"] == "invalid_json"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"documents": ["a"]}, "query"),
        ({"query": "q"}, "documents"),
        ({"query": "", "documents": ["a"]}, "query"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": ["a", 5]}, "documents.1"),
        ({"query": "q", "documents": [{"txt": "a"}]}, "documents.0"),
        ({"query": 3, "documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["a"], "top_n": -3}, "top_n"),
        ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
        ({"query": "q", "documents": ["a"], "instruction": ""}, "instruction"),
        ({"query": "q", "documents": ["a"], "instruction": 5}, "instruction"),
        ({"query": "q", "documents": ["a"], "instruction": "x" * 5000}, "instruction"),
        ([1, 2], "body"),
    ],
)
def test_invalid_fields_are_422_and_named(client, body, field):
    r = post(client, "/v1/rerank", body)
    assert r.status_code == 422, r.text
    err = r.get_json()
    assert err["error_type"] == "validation"
    assert field in err["error"]


def test_unknown_model_is_404_listing_served_models():
    two, _ = app_with(settings(models="tiny=/nowhere,spare=/nowhere"))
    r = post(two, "/v1/rerank", {"model": "gpt-4", **BODY})
    assert r.status_code == 404
    assert "tiny" in r.get_json()["error"] and "spare" in r.get_json()["error"]
    # No model named: the first served one answers.
    r = post(two, "/v1/rerank", BODY)
    assert r.status_code == 200 and r.get_json()["model"] == "tiny"


def test_single_model_answers_any_model_name(client):
    r = post(client, "/v1/rerank", {"model": "whatever-you-typed", **BODY})
    assert r.status_code == 200 and r.get_json()["model"] == "tiny"


def test_too_many_documents_or_too_large_body_is_413(client):
    r = post(client, "/v1/rerank", {"query": "q", "documents": ["d"] * 65})
    assert r.status_code == 413 and "MAX_DOCUMENTS" in r.get_json()["error"]
    r = post(client, "/v1/rerank", {"query": "q", "documents": ["x" * 300_000]})
    assert r.status_code == 413 and r.get_json()["error_type"] == "payload_too_large"
    r = post(client, "/v1/rerank", {"query": "q", "documents": ["d"] * 64})
    assert r.status_code == 200, r.text


def test_model_without_worker_is_503_at_once():
    lonely, _ = app_with(settings(models="tiny=/nowhere,spare=/nowhere"), workers={"tiny": [worker()]})
    r = post(lonely, "/v1/rerank", {"model": "spare", **BODY})
    assert r.status_code == 503 and r.get_json()["error_type"] == "unavailable"


def test_unknown_route_and_method_are_json(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code in (401, 404) and "error" in r.get_json()
    r = client.get("/v1/rerank", headers=auth())
    assert r.status_code == 405 and r.get_json()["error_type"] == "method_not_allowed"
    assert r.headers["Allow"]


# --- TEI's statuses and shape (moved from tests/test_long_documents.py) --------------------------


def test_tei_errors_have_tei_statuses_and_shape(client):
    for body, status in (({"query": "q", "texts": []}, 422), ({"query": "q"}, 422),
                         ({"query": "q", "texts": ["a"] * 65}, 422)):
        r = post(client, "/rerank", body)
        assert (r.status_code, r.get_json().get("error_type")) == (status, "Validation"), r.text
        assert set(r.get_json()) - {"fields"} == {"error", "error_type", "detail"}  # TEI's shape + FastAPI's detail
        assert r.get_json()["detail"] == r.get_json()["error"]
    r = post(client, "/rerank", data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.get_json()["error_type"] == "Validation"
    assert post(client, "/rerank", {"query": "q", "texts": ["a"]}, token=None).status_code == 401
    lonely, _ = app_with(settings(models="tiny=/nowhere,spare=/nowhere"), workers={"tiny": [worker()]})
    r = post(lonely, "/rerank", {"model": "spare", "query": "q", "texts": ["a"]})
    assert (r.status_code, r.get_json()["error_type"]) == (503, "Unhealthy")


# --- a worker's failure: one status per kind, in each format's names -------------------------------


@pytest.mark.parametrize("kind, status, tei", [
    ("input_too_long", 413, (413, "Validation")),
    ("instruction_not_accepted", 422, (422, "Validation")),
    ("engine_lost", 503, (503, "Unhealthy")),
    ("scoring_failed", 500, (424, "Backend")),
])
def test_a_worker_failure_has_one_status_per_kind_on_every_route(kind, status, tei):
    failing, _ = app_with(reply=ScoreReply(failure=Failure(kind=kind, message=f"it went {kind}")))
    for path, body in (("/v1/rerank", BODY), ("/v2/rerank", BODY), ("/rerank", BODY),
                       ("/score", {"text_1": "q", "text_2": ["d"]})):
        r = post(failing, path, body)
        assert r.status_code == status, (path, r.text)
        assert r.get_json()["error"] == f"it went {kind}"
    r = post(failing, "/rerank", {"query": "q", "texts": ["d"]})
    assert (r.status_code, r.get_json()["error_type"]) == tei


# --- the options each route resolves --------------------------------------------------------------


def _options_of(path: str, body: dict, headers: dict | None = None) -> ScoreOptions:
    client, fake = app_with()
    r = post(client, path, body, headers=headers or {})
    assert r.status_code == 200, r.text
    (call,) = fake.calls
    return call[3]


def test_every_format_resolves_its_names_into_the_same_options():
    raw = ScoreOptions(raw_scores=True)
    for path, body in (("/v1/rerank", {**BODY, "raw_scores": True}), ("/v2/rerank", {**BODY, "use_activation": False}),
                       ("/rerank", {**BODY, "use_activation": False}), ("/rerank", {"query": "q", "texts": ["d"],
                                                                                  "raw_scores": True}),
                       ("/score", {"text_1": "q", "text_2": "d", "use_activation": False})):
        assert _options_of(path, body) == raw, (path, body)
    left = _options_of("/rerank", {"query": "q", "texts": ["d"], "truncation_direction": "Left", "truncate": False})
    assert (left.direction, left.truncate) == ("left", False)
    chunked = _options_of("/v1/rerank", {**BODY, "max_chunks_per_doc": 3, "return_chunks": True, "instruction": "find it"})
    assert (chunked.chunk_overlap, chunked.max_chunks, chunked.return_chunks, chunked.instruction) == (32, 3, True, "find it")


def test_an_instruction_the_heartbeats_refuse_is_422_before_anything_is_queued():
    """Workers that say their model takes no instruction: refused at the call and at job creation."""
    refusing, fake = app_with(workers={"tiny": [worker(instruction=False)]})
    body = {**BODY, "instruction": "Given a query, find passages"}
    for path, headers, payload in (("/v1/rerank", {}, body), ("/v2/rerank", {}, body), ("/rerank", {}, body),
                                   ("/v1/rerank", {"Prefer": "respond-async"}, body),
                                   ("/v1/rerank/jobs", {}, {"items": [BODY], "instruction": body["instruction"]})):
        r = post(refusing, path, payload, headers=headers)
        assert r.status_code == 422, (path, r.text)
        assert r.get_json()["fields"] == [{"field": "instruction", "message": r.get_json()["error"]}]
    assert fake.calls == []
    upload = post(refusing, "/v1/rerank/jobs?instruction=find", data=json.dumps(BODY).encode(),
                  headers={"Content-Type": "application/jsonl"})
    assert upload.status_code == 422, upload.text
    # A worker that takes one, or does not say: the call goes on.
    for flags in ([worker(instruction=True)], [worker()], [worker(instruction=False), worker(instruction=True)]):
        taking, fake = app_with(workers={"tiny": flags})
        assert post(taking, "/v1/rerank", body).status_code == 200
        assert fake.calls[0][3].instruction == body["instruction"]


# --- answers, errors and documents of every route (moved from tests/test_clients.py) --------------

QUERY = "what is a panda?"
DOCS = ["hi", "The giant panda is a bear species endemic to China.", "熊猫是中国特有的熊科动物",
        "Redis is an in-memory data store used as a queue here.", ""]


def test_answers_keep_their_field_order(client):
    v1 = post(client, "/v1/rerank", {"query": QUERY, "documents": DOCS[:2], "return_documents": True}).get_json()
    assert list(v1) == ["id", "model", "results", "meta", "usage"]
    assert list(v1["results"][0]) == ["index", "relevance_score", "document"]
    assert v1["usage"] == {"total_tokens": v1["meta"]["tokens"]["input_tokens"],
                           "prompt_tokens": v1["meta"]["tokens"]["input_tokens"]}
    v2 = post(client, "/v2/rerank", {"query": QUERY, "documents": DOCS[:2]}).get_json()
    assert list(v2) == ["id", "results", "meta", "model", "usage"]
    assert list(v2["results"][0]) == ["index", "relevance_score"]
    assert v2["meta"] == {"api_version": {"version": "2"},
                          "tokens": {"input_tokens": v2["usage"]["total_tokens"], "output_tokens": 0}}
    score = post(client, "/score", {"text_1": QUERY, "text_2": DOCS[:2]}).get_json()
    assert list(score) == ["id", "object", "created", "model", "data", "usage"]
    assert list(score["data"][0]) == ["index", "object", "score"]


def test_every_error_body_has_detail():
    """The same body on every route and status, werkzeug's own 404/405/413 and TEI's route included."""
    two, _ = app_with(settings(models="tiny=/nowhere,spare=/nowhere"), workers={"tiny": [worker()]})
    big = json.dumps({"query": "q", "documents": ["x" * 300_000]}).encode()
    json_headers = {**auth(), "Content-Type": "application/json"}
    calls = {
        "401 /v2/rerank": lambda: two.post("/v2/rerank", json={"query": "q", "documents": ["a"]}),
        "401 /score": lambda: two.post("/score", json={"text_1": "q", "text_2": "a"}),
        "401 /rerank": lambda: two.post("/rerank", json={"query": "q", "texts": ["a"]}),
        "401 /v1/models/tiny": lambda: two.get("/v1/models/tiny"),
        "404 unknown route": lambda: two.get("/nothing-here"),
        "404 unknown model": lambda: two.get("/v1/models/gpt-4", headers=auth()),
        "404 model not served": lambda: post(two, "/v2/rerank", {"model": "x", "query": "q", "documents": ["a"]}),
        "405 wrong method": lambda: two.get("/v2/rerank", headers=auth()),
        "405 wrong method (TEI)": lambda: two.get("/rerank", headers=auth()),
        "413 body (werkzeug)": lambda: two.post("/v2/rerank", data=big, headers=json_headers),
        "413 body (TEI)": lambda: two.post("/rerank", data=big, headers=json_headers),
        "413 body (score)": lambda: two.post("/score", data=big, headers=json_headers),
        "400 invalid JSON": lambda: two.post("/score", data=b"{x", headers=json_headers),
        "422 TEI": lambda: post(two, "/rerank", {"query": "", "texts": ["a"]}),
        "503 no worker (TEI)": lambda: post(two, "/rerank", {"model": "spare", "query": "q", "texts": ["a"]}),
        "503 no worker": lambda: post(two, "/score", {"model": "spare", "text_1": "q", "text_2": "a"}),
    }
    for name, call in calls.items():
        r = call()
        assert str(r.status_code) == name.split()[0], (name, r.status_code, r.text[:200])
        body = r.get_json()
        assert body["detail"] == body["error"] and body["error"] and body["error_type"], (name, body)


def test_rerank_refuses_both_bodies_or_neither(client):
    """(The scores of either body: tests/test_clients.py.)"""
    for ambiguous in ({"query": QUERY, "texts": DOCS, "documents": DOCS}, {"query": QUERY}, {"texts": None}):
        r = post(client, "/rerank", ambiguous)
        assert r.status_code == 422, r.text
        assert "exactly one of `texts`" in r.get_json()["detail"]
    # A Cohere body's own errors are the Cohere route's (here: our 413, not TEI's 422).
    r = post(client, "/rerank", {"query": QUERY, "documents": ["d"] * 65})
    assert (r.status_code, r.get_json()["error_type"]) == (413, "payload_too_large")


def test_docs_page_works_offline(client):
    import re
    from html.parser import HTMLParser

    class Assets(HTMLParser):
        urls: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    page = client.get("/docs", follow_redirects=True)  # redirects to /docs/
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    parser = Assets()
    parser.urls = []
    parser.feed(page.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in parser.urls)
    assert any(u.endswith("swagger-ui.css") for u in parser.urls)
    for url in parser.urls:
        assert not re.match(r"^(https?:)?//", url), f"{url} is not served by us"
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.data) > 100, url
    assert not re.search(r"https?://(?!127\.0\.0\.1|localhost)", page.text.replace("http://www.w3.org", ""))
    assert '"url": "/openapi.json"' in page.text and '"validatorUrl": null' in page.text


def test_openapi_describes_every_answer_and_the_same_auth_as_the_app(client):
    doc = client.get("/openapi.json").get_json()

    def ref(path: str, method: str = "post", status: str = "200") -> dict:
        return doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]

    assert ref("/v2/rerank")["$ref"].rsplit("/", 1)[-1].startswith("RerankV2Response")
    assert ref("/v1/rerank")["$ref"].rsplit("/", 1)[-1].startswith("RerankResponse")
    assert ref("/score")["$ref"].rsplit("/", 1)[-1].startswith("ScoreResponse")
    assert ref("/v1/score") == ref("/score")
    assert len(ref("/rerank")["oneOf"]) == 2
    body = doc["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(body["oneOf"]) == 2
    assert ref("/v1/models/{model_id}", "get")["$ref"].rsplit("/", 1)[-1].startswith("ModelCard")
    error = ref("/v2/rerank", status="422")["$ref"].rsplit("/", 1)[-1]
    assert set(doc["components"]["schemas"][error]["required"]) == {"error", "error_type", "detail"}
    # Whatever the document says needs the token does, and nothing else does.
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            url = path.replace("{job_id}", "job_" + "0" * 32).replace("{model_id}", "tiny")
            r = client.open(url, method=method.upper(), json={})
            assert (r.status_code == 401) == bool(op.get("security")), (method, path, r.status_code)
    assert {p for p, m in doc["paths"].items() if any(op.get("security") for op in m.values())} >= {
        "/v1/rerank", "/v2/rerank", "/rerank", "/score", "/v1/score", "/v1/models", "/v1/models/{model_id}"}
    request = doc["paths"]["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "instruction" in doc["components"]["schemas"][request["$ref"].rsplit("/", 1)[-1]]["properties"]


def test_request_ids_are_unique_per_call(client):
    import uuid

    ids = {post(client, "/v2/rerank", {"query": "q", "documents": ["a"]}).get_json()["id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == len(uuid.uuid4().hex) for i in ids)
