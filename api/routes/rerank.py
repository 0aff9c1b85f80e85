"""`POST /v1/rerank`: FastGPT's call, Cohere/Jina's format. Validate, dispatch, shape."""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request

from api.errors import ApiError
from api.routes.jobs import accepted, jobs, owner_token
from api.validation import parse_body, resolve_model
from shared.ranking import shape_results
from api.openapi import documented
from shared.schemas import JobCreated, JobItem, RerankRequest, RerankResponse
from shared.settings import Settings

bp = Blueprint("rerank", __name__)


@bp.post("/v1/rerank")
@documented(
    summary="Rerank documents for a query (FastGPT, Cohere and Jina format)",
    body=RerankRequest,
    responses={200: RerankResponse, 202: JobCreated},
    errors=(400, 404, 413, 422, 429, 500, 503, 504),
    headers={"Prefer": "`respond-async`: answer 202 with a job instead of waiting",
             "X-Request-Id": "echoed back; generated when absent"},
)
def rerank():
    settings: Settings = current_app.config["SETTINGS"]
    req = parse_body(RerankRequest)
    if len(req.documents) > settings.max_documents:
        raise ApiError(
            413, f"{len(req.documents)} documents; at most {settings.max_documents} (MAX_DOCUMENTS)"
        )
    model = resolve_model(settings, req.model)
    if "respond-async" in request.headers.get("Prefer", ""):
        item = JobItem(query=req.query, documents=req.documents, top_n=req.top_n)
        job = jobs().create_from_items(model, [("body", item)], owner=owner_token(), options=req)
        response = accepted(job)
        response.headers["Preference-Applied"] = "respond-async"
        return response
    texts = req.texts()
    scored = current_app.extensions["dispatcher"].score(model, req.query, texts, g.request_id, req.score_options())
    results = shape_results(
        scored.logits, texts, raw_scores=req.raw_scores, top_n=req.top_n,
        return_documents=req.return_documents,
        chunks=(scored.chunks or [1] * len(texts)) if req.return_chunks else None,
    )
    # Shaped as RerankResponse (shared/schemas.py), built as a plain dict: no second validation.
    return jsonify(
        id=g.request_id,
        model=model.name,
        results=results,
        meta={"tokens": {"input_tokens": scored.input_tokens}},
        usage={"total_tokens": scored.input_tokens},
    )
