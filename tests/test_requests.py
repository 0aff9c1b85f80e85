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
def test_bad_or_missing_token_is_401_on_every_protected_route(client, header):
    doc = client.get("/openapi.json").get_json()
    operations = [(method.upper(), path.replace("{job_id}", "job_" + "0" * 32))
                  for path, methods in doc["paths"].items() for method, op in methods.items() if op.get("security")]
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
