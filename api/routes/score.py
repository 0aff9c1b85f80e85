"""vLLM's score API: `POST /score` and `POST /v1/score` score (text_1, text_2) pairs and answer one
score per pair, in input order (vLLM's ScoreResponse).

Pairs that share a query are one call to the workers, like a rerank call. N different queries
(vLLM's N:N form) are N calls, sent together so the worker batches them into the same forward
passes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, current_app, g

from api.answers import answer
from api.errors import ApiError
from api.openapi import documented
from api.validation import parse_body, resolve_model
from shared.ranking import normalise
from shared.schemas import ScoreData, Scored, ScoreRequest, ScoreResponse, ScoreUsage
from shared.settings import Settings

bp = Blueprint("score", __name__)

#: Calls in flight at once for one N:N request (each is one pending realtime call for admission).
MAX_PARALLEL_CALLS = 8


@bp.post("/score")
@bp.post("/v1/score")
@documented(summary="Score (text_1, text_2) pairs: vLLM's score API, one score per pair in input order",
            body=ScoreRequest, responses={200: ScoreResponse}, errors=(400, 404, 413, 422, 429, 500, 503, 504),
            headers={"X-Request-Id": "echoed back; generated when absent"})
def score():
    settings: Settings = current_app.config["SETTINGS"]
    req = parse_body(ScoreRequest)
    pairs = req.pairs()
    if len(pairs) > settings.max_documents:
        raise ApiError(413, f"{len(pairs)} pairs; at most {settings.max_documents} (MAX_DOCUMENTS)")
    model = resolve_model(settings, req.model)
    by_query: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        by_query.setdefault(query, []).append(i)

    dispatcher, request_id, options = current_app.extensions["dispatcher"], g.request_id, req.options()

    def call(query: str) -> Scored:
        return dispatcher.score(model, query, [pairs[i][1] for i in by_query[query]], request_id, options)

    if len(by_query) == 1:
        answers = [call(pairs[0][0])]
    else:
        with ThreadPoolExecutor(min(MAX_PARALLEL_CALLS, len(by_query))) as pool:
            answers = list(pool.map(call, by_query))
    logits = [0.0] * len(pairs)
    for indexes, scored in zip(by_query.values(), answers):
        for i, logit in zip(indexes, scored.logits):
            logits[i] = logit
    tokens = sum(scored.input_tokens for scored in answers)
    raw = options.raw_scores
    return answer(ScoreResponse(
        id=request_id, model=model.name,
        data=[ScoreData(index=i, score=x) for i, x in enumerate(normalise(logits, raw_scores=raw))],
        usage=ScoreUsage(prompt_tokens=tokens, total_tokens=tokens),
    ))
