"""`POST /v1/rerank`: FastGPT's call, Cohere/Jina's format. Validate, dispatch, shape."""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify

from api.errors import ApiError
from api.validation import parse_body
from shared.ranking import rank
from shared.schemas import (
    Meta,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultDocument,
    TokenCount,
    Usage,
)
from shared.settings import ModelSpec, Settings

bp = Blueprint("rerank", __name__)


def resolve_model(settings: Settings, name: str | None) -> ModelSpec:
    spec = settings.model(name)
    if spec is None:
        served = [s.name for s in settings.served_models]
        raise ApiError(404, f"model {name!r} is not served; served models: {', '.join(served)}")
    return spec


@bp.post("/v1/rerank")
def rerank():
    settings: Settings = current_app.config["SETTINGS"]
    req = parse_body(RerankRequest)
    if len(req.documents) > settings.max_documents:
        raise ApiError(
            413, f"{len(req.documents)} documents; at most {settings.max_documents} (MAX_DOCUMENTS)"
        )
    model = resolve_model(settings, req.model)
    texts = req.texts()
    scored = current_app.extensions["dispatcher"].score(model, req.query, texts, g.request_id)
    ranked = rank(scored.logits, raw_scores=req.raw_scores, top_n=req.top_n)
    response = RerankResponse(
        id=g.request_id,
        model=model.name,
        results=[
            RerankResult(
                index=i,
                relevance_score=score,
                document=RerankResultDocument(text=texts[i]) if req.return_documents else None,
            )
            for i, score in ranked
        ],
        meta=Meta(tokens=TokenCount(input_tokens=scored.input_tokens)),
        usage=Usage(total_tokens=scored.input_tokens),
    )
    return jsonify(response.model_dump(exclude_none=True))
