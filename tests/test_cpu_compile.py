"""TORCH_COMPILE: on a CPU the model runs through torch.compile (inductor) once the worker warmed
it up, scores as eager does within the bf16 bound, and stays eager when compiling fails."""

from __future__ import annotations

import random

import numpy as np
import torch

from engine import Engine, EngineConfig
from rerank.random_model import documents_of_length, sentence
from tests.test_cpu_dtype import SCORE_BOUND


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_compiled_engine_scores_like_the_eager_one(model_dir, engine, tokenizer):
    rng = random.Random(5)
    lists = [(sentence(rng, 6), documents_of_length(tokenizer, [rng.randint(5, 120) for _ in range(12)], seed=k))
             for k in range(2)]
    compiled = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype="bfloat16", torch_compile=True))
    try:
        assert compiled.info["backend"] == "torch compile (inductor)", compiled.info.get("torch_compile")
        assert compiled.info["torch_compile"].startswith("inductor")
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        for query, docs in lists:  # batches of shapes the warm-up did not see: dynamic shapes, no failure
            ref = sigmoid(engine.score(query, docs).logits)
            got = sigmoid(compiled.score(query, docs).logits)
            assert np.max(np.abs(ref - got)) <= SCORE_BOUND
        got = compiled.score(lists[0][0], lists[0][1][:1]).logits  # one row: compiled at warm-up too
        assert abs(sigmoid(got[0]) - sigmoid(engine.score(lists[0][0], lists[0][1][:1]).logits[0])) <= SCORE_BOUND
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up
    finally:
        compiled.stop()


def test_a_failing_compile_leaves_the_model_eager(model_dir, engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    eager = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype="float32", torch_compile=True))
    try:
        assert eager.info["backend"] == "torch eager"
        assert "not compiled (RuntimeError: no C++ compiler here)" in eager.info["torch_compile"]
        docs = ["a short document", "another one about redis"]
        assert np.allclose(eager.score("query", docs).logits, engine.score("query", docs).logits, atol=1e-6)
    finally:
        eager.stop()
