"""CPU_BACKEND: a cross-encoder's encoder run by OpenVINO (engine/backends/openvino_cpu.py).

`auto` takes it exactly for bf16 on a CPU with AMX; in float32 it gives torch's scores; at the
machine's auto precision it stays within the bound docs/cpu.md states for bf16; a model it
cannot run (a causal-LM family) runs on torch, saying why; a worker left at the defaults serves
calls on the machine's choice and says so in /v1/models; its converter sends no telemetry."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import requests
import torch

from engine import Engine, EngineConfig
from engine.backends import cpu_choice
from engine.backends.cpu_dtype import cpu_bf16_units, resolve_dtype
from rerank.random_model import documents_of_length, sentence
from tests.procs import start_api, start_worker
from tests.test_cpu_dtype import SCORE_BOUND

# Not importorskip: importing openvino here, before the backend's `without_telemetry`, would
# load the real telemetry module into this process (requirements/worker.txt installs openvino).
if importlib.util.find_spec("openvino") is None:
    pytest.skip("openvino is not installed", allow_module_level=True)


def machine_choice() -> str:
    """What CPU_BACKEND=auto with DTYPE=auto should pick on this machine (docs/cpu.md)."""
    return "openvino" if "amx_bf16" in cpu_bf16_units() else "torch"


def test_auto_takes_openvino_exactly_for_bf16_on_an_amx_cpu():
    def choice(**kw):
        return cpu_choice(EngineConfig(source="unused", **kw))

    assert choice(dtype="auto")[0] == machine_choice()
    assert choice(dtype="float32")[0] == "torch" and "reference" in choice(dtype="float32")[1]
    assert choice(dtype="float32", cpu_backend="openvino") == ("openvino", "CPU_BACKEND=openvino")
    assert choice(dtype="auto", cpu_backend="torch") == ("torch", "CPU_BACKEND=torch")
    assert choice(dtype="auto", torch_compile=True)[0] == "torch"  # TORCH_COMPILE is torch's


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x)))


@pytest.fixture(scope="module")
def lists(tokenizer):
    rng = random.Random(5)
    return [(sentence(rng, 6), documents_of_length(tokenizer, [rng.randint(20, 300) for _ in range(12)], seed=k))
            for k in range(2)]


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_openvino_scores_like_torch_float32(model_dir, engine, lists, dtype):
    """`engine` is the float32 torch reference; float32 OpenVINO matches it to rounding, the auto
    precision (bf16 where the CPU has bf16 matrix units) within the bf16 bound."""
    ov = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype=dtype, cpu_backend="openvino",
                                   torch_threads=1))
    try:
        expected = str(resolve_dtype(dtype, torch.device("cpu")).dtype).removeprefix("torch.")
        assert ov.info["backend"].startswith("openvino") and ov.info["dtype"] == expected, ov.info
        assert "OpenVINO" in ov.info["dtype_reason"]
        bound = 1e-4 if expected == "float32" else SCORE_BOUND
        for query, docs in lists:
            ref, got = sigmoid(engine.score(query, docs).logits), sigmoid(ov.score(query, docs).logits)
            assert np.max(np.abs(ref - got)) <= bound
            if expected == "float32":
                assert list(np.argsort(-ref)) == list(np.argsort(-got))
    finally:
        ov.stop()


def test_a_model_openvino_cannot_run_runs_on_torch_and_says_why(qwen3_dir):
    scorer = Engine.start(EngineConfig(source=str(qwen3_dir), device="cpu", dtype="float32", cpu_backend="openvino",
                                       torch_threads=1))
    try:
        assert scorer.info["backend"] == "torch eager"
        assert "openvino" in scorer.info["backend_reason"] and "qwen3" in scorer.info["backend_reason"]
        assert len(scorer.score("what is it", ["a cat", "a dog"]).logits) == 2
    finally:
        scorer.stop()


@pytest.mark.stack
def test_a_worker_at_the_defaults_runs_the_machines_choice_and_says_so(stack_env, model_dir, log_dir, engine,
                                                                       lists):
    """DTYPE and CPU_BACKEND left at auto: OpenVINO on a CPU with AMX, torch elsewhere; scores
    within the bf16 bound of the float32 reference either way."""
    env = {k: v for k, v in stack_env.items() if k not in ("DTYPE", "CPU_BACKEND")}
    env.update(MODELS=f"ov-tiny={model_dir}")
    worker = start_worker("worker-ov-tiny", env, log_dir, "ov-tiny")
    proc = None
    try:
        proc, url = start_api("api-ov-tiny", env, log_dir)
        headers = {"Authorization": f"Bearer {env['ACCESS_TOKEN'].split(',')[0]}"}
        (card,) = requests.get(url + "/v1/models", headers=headers, timeout=5).json()["data"]
        want = "openvino" if machine_choice() == "openvino" else "torch"
        assert card["backends"] and all(b.startswith(want) for b in card["backends"]), card
        assert card["backend_reasons"] and all("CPU_BACKEND=auto" in r for r in card["backend_reasons"]), card
        for query, docs in lists:
            body = requests.post(url + "/v1/rerank", headers=headers, timeout=30,
                                 json={"model": "ov-tiny", "query": query, "documents": docs}).json()
            got = {r["index"]: r["relevance_score"] for r in body["results"]}
            ref = sigmoid(engine.score(query, docs).logits)
            assert max(abs(got[i] - ref[i]) for i in range(len(docs))) <= SCORE_BOUND
    finally:
        if proc is not None:
            proc.stop()
        worker.stop()


def test_the_converter_sends_no_telemetry(model_dir):
    """engine/backends/openvino_cpu.py `without_telemetry`: the converter runs on its stub."""
    ov = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype="float32", cpu_backend="openvino",
                                   torch_threads=1))
    try:
        from openvino.tools.ovc import convert_impl

        assert ov.info["backend"].startswith("openvino")
        assert convert_impl.tm.__name__ == "openvino.tools.ovc.telemetry_stub"
    finally:
        ov.stop()
