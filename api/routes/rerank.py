"""The Cohere-format rerank routes: `POST /v1/rerank` (FastGPT, Cohere v1, Jina, vLLM) and
`POST /v2/rerank` (Cohere v2: the SDK's ClientV2, langchain-cohere, LlamaIndex, litellm's cohere/).
Same request, same scoring; only the answer's shape differs. `POST /rerank` with `documents`
(vLLM, Infinity) comes here too, from api/routes/tei.py.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request

from api.answers import answer
from api.errors import ApiError
from api.openapi import documented
from api.routes.jobs import accepted, jobs, owner_token
from api.validation import parse_body, resolve_model
from shared.ranking import results_of
from shared.schemas import JobCreated, JobItem, RerankRequest, RerankResponse, RerankV2Response
from shared.settings import Settings

bp = Blueprint("rerank", __name__)

ERRORS = (400, 404, 413, 422, 429, 500, 503, 504)
REQUEST_ID = {"X-Request-Id": "echoed back; generated when absent"}


@bp.post("/v1/rerank")
@documented(
    summary="Rerank documents for a query (FastGPT, Cohere v1, Jina and vLLM format)",
    body=RerankRequest,
    responses={200: RerankResponse, 202: JobCreated},
    errors=ERRORS,
    headers={"Prefer": "`respond-async`: answer 202 with a job instead of waiting", **REQUEST_ID},
)
def rerank_v1():
    req = parse_body(RerankRequest)
    if "respond-async" in request.headers.get("Prefer", ""):
        return _as_job(req)
    return rerank_answer(req, RerankResponse)


@bp.post("/v2/rerank")
@documented(
    summary="Rerank documents for a query (Cohere v2 format, plus model and usage)",
    body=RerankRequest,
    responses={200: RerankV2Response},
    errors=ERRORS,
    headers=REQUEST_ID,
)
def rerank_v2():
    return rerank_answer(parse_body(RerankRequest), RerankV2Response)


def rerank_answer(req: RerankRequest, shape: type[RerankResponse | RerankV2Response]) -> Response:
    """Score `req` in one call to the workers and answer in `shape` (sorted high to low, cut to top_n)."""
    settings: Settings = current_app.config["SETTINGS"]
    _check_size(settings, len(req.documents))
    model = resolve_model(settings, req.model)
    texts, options = req.texts(), req.options()
    scored = current_app.extensions["dispatcher"].score(model, req.query, texts, g.request_id, options)
    results = results_of(scored, texts, options, req.keep())
    return answer(shape.of(g.request_id, model.name, results, scored.input_tokens))


def _as_job(req: RerankRequest) -> Response:
    """`Prefer: respond-async`: a one-item bulk job instead of waiting (202), with the same
    resolved options as the call would have had, so it gives the same scores."""
    settings: Settings = current_app.config["SETTINGS"]
    _check_size(settings, len(req.documents))
    model = resolve_model(settings, req.model)
    item = JobItem(query=req.query, documents=req.documents, top_n=req.keep())
    job = jobs().create_from_items(model, [("body", item)], owner=owner_token(), options=req.options())
    response = accepted(job)
    response.headers["Preference-Applied"] = "respond-async"
    return response


def _check_size(settings: Settings, count: int) -> None:
    if count > settings.max_documents:
        raise ApiError(413, f"{count} documents; at most {settings.max_documents} (MAX_DOCUMENTS)")
