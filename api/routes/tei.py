"""TEI-compatible routes, so clients written for text-embeddings-inference (Dify, LangChain,
LlamaIndex) work unchanged: `POST /rerank` answers a bare array and TEI's error shape
(`{"error", "error_type"}` with TEI's type names and statuses); `GET /info` describes the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from flask import Blueprint, current_app, g, jsonify
from pydantic import BaseModel, Field, StrictBool, StrictStr
from werkzeug.exceptions import RequestEntityTooLarge

from api.errors import ApiError
from api.openapi import documented
from api.validation import parse_body
from shared.ranking import rank
from shared.schemas import LongDocuments
from shared.settings import Settings

bp = Blueprint("tei", __name__)

#: Our status -> (TEI's status, TEI's error_type).
_TEI_ERRORS = {
    400: (422, "Validation"), 404: (422, "Validation"), 413: (413, "Validation"), 422: (422, "Validation"),
    429: (429, "Overloaded"), 500: (424, "Backend"), 503: (503, "Unhealthy"), 504: (424, "Backend"),
}


class TeiRerankRequest(BaseModel):
    """TEI's `/rerank` body. `truncate` unset: cut long texts (as TEI's --auto-truncate)."""

    query: Annotated[StrictStr, Field(min_length=1)]
    texts: Annotated[list[StrictStr], Field(min_length=1)]
    truncate: StrictBool | None = Field(default=None, description="false: texts that do not fit are an error (413)")
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    model: StrictStr | None = None


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TeiInfo(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str


def _tei_error(error: ApiError):
    status, kind = _TEI_ERRORS.get(error.status, (error.status, "Backend"))
    response = jsonify(error=error.message, error_type=kind)
    response.status_code = status
    response.headers.update(error.headers)
    return response


@bp.post("/rerank")
@documented(summary="TEI-compatible rerank: bare array of {index, score, text?}", body=TeiRerankRequest,
            responses={200: {"application/json": {"schema": {"type": "array", "items": {
                "$ref": "#/components/schemas/TeiRank"}}}}},
            errors=(413, 422, 424, 429, 503), schemas=(TeiRank,), tag="tei")
def tei_rerank():
    settings: Settings = current_app.config["SETTINGS"]
    try:
        req = parse_body(TeiRerankRequest)
        if len(req.texts) > settings.max_documents:
            raise ApiError(422, f"batch size {len(req.texts)} > maximum allowed batch size {settings.max_documents}")
        model = settings.model(req.model) or settings.served_models[0]
        options = LongDocuments(truncation_direction=req.truncation_direction.lower()).score_options(
            truncate=req.truncate is not False)
        scored = current_app.extensions["dispatcher"].score(model, req.query, req.texts, g.request_id, options)
    except ApiError as error:
        return _tei_error(error)
    except RequestEntityTooLarge:
        return _tei_error(ApiError(413, f"request body larger than {settings.max_request_bytes} bytes"))
    ranks = [{"index": i, "score": s, **({"text": req.texts[i]} if req.return_text else {})}
             for i, s in rank(scored.logits, raw_scores=req.raw_scores)]
    return jsonify(ranks)


@bp.get("/info")
@documented(summary="TEI-compatible model information", responses={200: TeiInfo}, tag="tei")
def tei_info():
    settings: Settings = current_app.config["SETTINGS"]
    spec = settings.served_models[0]
    workers = current_app.extensions["dispatcher"].workers.alive(spec.name)
    return jsonify(
        model_id=spec.source,
        model_sha=None,
        model_dtype=workers[0]["dtype"] if workers else settings.dtype,
        model_type={"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
        max_concurrent_requests=settings.api_workers * settings.api_connections,
        max_input_length=spec.max_length,
        max_batch_tokens=settings.max_batch_tokens or 0,
        max_batch_requests=None,
        max_client_batch_size=settings.max_documents,
        auto_truncate=True,
        tokenization_workers=settings.worker_concurrency,
        version="1.0",
    )
