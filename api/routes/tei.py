"""`POST /rerank` in both formats clients post there, and TEI's `GET /info`.

- With `texts`: text-embeddings-inference's call (Dify's TEI plugin, LangChain, LlamaIndex). A
  bare array answers, and errors take TEI's statuses and type names (424 for a scoring failure,
  `Validation`, `Overloaded`...).
- With `documents`: the Cohere body that vLLM, Infinity, litellm's `hosted_vllm/` and
  `infinity/` providers and FastGPT without `/v1` in its base URL post there; it is answered
  exactly as `POST /v1/rerank` answers it.

A body with both lists or neither is a 422 that says so: guessing could answer in the shape the
client does not read.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g
from werkzeug.exceptions import RequestEntityTooLarge

from api.answers import answer
from api.errors import ApiError, error_response
from api.openapi import documented
from api.routes.rerank import rerank_answer
from api.validation import JsonObject, parse_body, validate
from shared.ranking import rank
from shared.schemas import (
    RERANK_BODIES,
    RerankRequest,
    RerankResponse,
    TeiInfo,
    TeiRank,
    TeiRerankRequest,
    TeiRerankResponse,
    rerank_body_model,
)
from shared.settings import Settings

bp = Blueprint("tei", __name__)

def _tei_error(error: ApiError) -> Response:
    """TEI's statuses and type names (api/errors.py STATUSES) for an error of its format."""
    return error_response(error, tei=True)


@bp.post("/rerank")
@documented(summary="Rerank with TEI's body (`texts`: bare array of {index, score, text?}) or the Cohere/vLLM "
                    "body (`documents`: answered as /v1/rerank)",
            body=(TeiRerankRequest, RerankRequest),
            responses={200: (TeiRerankResponse, RerankResponse)},
            errors=(400, 404, 413, 422, 424, 429, 500, 503, 504), tag="tei")
def rerank_either():
    settings: Settings = current_app.config["SETTINGS"]
    try:
        body = parse_body(JsonObject).root
        kind = rerank_body_model(body)
        if kind is None:
            raise ApiError(422, "the body must have exactly one of `texts` (TEI's format) and `documents` "
                                "(the Cohere, Jina and vLLM format)",
                           fields=[{"field": name, "message": "exactly one of these is required"}
                                   for name in RERANK_BODIES])
    except ApiError as error:
        return _tei_error(error)
    except RequestEntityTooLarge:
        return _tei_error(ApiError(413, f"request body larger than {settings.max_request_bytes} bytes"))
    if kind is RerankRequest:
        return rerank_answer(validate(RerankRequest, body), RerankResponse)
    try:
        return _tei_rerank(settings, validate(TeiRerankRequest, body))
    except ApiError as error:
        return _tei_error(error)


def _tei_rerank(settings: Settings, req: TeiRerankRequest) -> Response:
    if len(req.texts) > settings.max_documents:
        raise ApiError(422, f"batch size {len(req.texts)} > maximum allowed batch size {settings.max_documents}")
    model = settings.model(req.model) or settings.served_models[0]
    options = req.options()
    scored = current_app.extensions["dispatcher"].score(model, req.query, req.texts, g.request_id, options)
    return answer(TeiRerankResponse([
        TeiRank(index=i, score=score, text=req.texts[i] if req.return_text else None)
        for i, score in rank(scored.logits, raw_scores=options.raw_scores)]))


@bp.get("/info")
@documented(summary="TEI-compatible model information", responses={200: TeiInfo}, tag="tei")
def tei_info():
    settings: Settings = current_app.config["SETTINGS"]
    spec = settings.served_models[0]
    workers = current_app.extensions["dispatcher"].workers.alive(spec.name)
    return answer(TeiInfo(
        model_id=spec.source,
        model_sha=None,
        model_dtype=workers[0]["dtype"] if workers else settings.dtype,
        model_type={"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
        max_concurrent_requests=settings.api_workers * settings.api_connections,
        max_input_length=spec.max_length,
        family=next((w["family"] for w in workers if w.get("family")), spec.family),
        context_length=next((w["context_length"] for w in workers if w.get("context_length")), spec.max_length),
        max_batch_tokens=settings.max_batch_tokens or 0,
        max_batch_requests=None,
        max_client_batch_size=settings.max_documents,
        auto_truncate=True,
        tokenization_workers=settings.worker_concurrency,
        version="1.0",
        simulated=any(w.get("simulated") for w in workers),
        dtype_reason=workers[0].get("dtype_reason") if workers else None,
    ))
