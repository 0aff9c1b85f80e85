"""FastGPT's original bge-rerank server's way of scoring, as a baseline: one request at a time,
no cross-request batching, each request's pairs in unsorted batches of 256 (docs/reference-scoring.md, FastGPT's own server), eager
forward passes.

    MODEL_DIR=… DEVICE=cuda|cpu|sim gunicorn -w 1 -k sync 'bench.naive_server:create_app()'
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from flask import Flask, jsonify, request

from engine import EngineConfig
from engine.backends import Backend, PaddedBatch, forward, load_backend
from engine.encoding import Encoder
from shared.ranking import rank

SEED_BATCH = 256


def naive_scores(encoder: Encoder, backend: Backend, query: str, documents: Sequence[str]) -> list[float]:
    """FlagReranker as FastGPT's original server calls it: same truncation, input order, batches of 256."""
    sequences = encoder.encode(query, documents).sequences()
    logits: list[float] = []
    for start in range(0, len(sequences), SEED_BATCH):
        logits.extend(forward(backend, PaddedBatch.of(sequences[start : start + SEED_BATCH], backend.pad_id)).tolist())
    return logits


def load(source: str, device: str) -> tuple[Encoder, Backend]:
    # torch, as FlagReranker runs: never the OpenVINO backend CPU_BACKEND=auto takes on an AMX CPU.
    config = EngineConfig(source=source, device=device, cuda_graphs=False, cpu_backend="torch",
                          sim_profile=os.environ.get("SIM_PROFILE"))
    return Encoder.load(source), load_backend(config)


def create_app() -> Flask:
    encoder, backend = load(os.environ["MODEL_DIR"], os.environ.get("DEVICE", "auto"))
    app = Flask(__name__)

    @app.post("/v1/rerank")
    def rerank():
        body = request.get_json()
        logits = naive_scores(encoder, backend, body["query"], body["documents"])
        return jsonify(results=[{"index": i, "relevance_score": s} for i, s in rank(logits)])

    return app
