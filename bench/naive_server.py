"""The seed server's way of scoring, as a baseline: one request at a time, no cross-request
batching, each request's pairs in unsorted batches of 256 (CONTRACT §2).

    MODEL_DIR=… PORT=… gunicorn -w 1 -k sync 'bench.naive_server:create_app()'
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from flask import Flask, jsonify, request

from shared.ranking import rank
from worker.model import Reranker, load_reranker

SEED_BATCH = 256


def naive_scores(reranker: Reranker, query: str, documents: Sequence[str]) -> list[float]:
    """FlagReranker as the seed calls it: same truncation, input order, batches of 256."""
    encoded = reranker.encode(query, documents)
    logits: list[float] = []
    for start in range(0, len(encoded), SEED_BATCH):
        logits.extend(reranker.forward(encoded[start : start + SEED_BATCH]))
    return logits


def create_app() -> Flask:
    reranker = load_reranker(os.environ["MODEL_DIR"], device=os.environ.get("DEVICE", "auto"))
    app = Flask(__name__)

    @app.post("/v1/rerank")
    def rerank():
        body = request.get_json()
        logits = naive_scores(reranker, body["query"], body["documents"])
        return jsonify(results=[{"index": i, "relevance_score": s} for i, s in rank(logits)])

    return app
