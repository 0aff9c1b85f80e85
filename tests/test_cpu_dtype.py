"""DTYPE=auto on a CPU: bf16 where the CPU has native bf16 matrix units, float32 where it does not
or where DTYPE=float32 says so; the choice and its reason reach /v1/models and /info; bf16 scores
stay within the bound docs/cpu.md states."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from engine import Engine, EngineConfig
from engine.backends.cpu_dtype import cpu_bf16_units, resolve_dtype
from rerank.random_model import documents_of_length, sentence
from tests.procs import start_api, start_worker

#: docs/cpu.md, "Fidelity": the largest score (sigmoid) difference bf16 may make against float32.
SCORE_BOUND = 0.01


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_picks_bf16_exactly_where_the_cpu_has_bf16_matrix_units():
    flags = cpu_flags()
    native = sorted({"amx_bf16", "avx512_bf16"} & flags)
    assert cpu_bf16_units() == [f for f in ("amx_bf16", "avx512_bf16") if f in native]
    dtype, reason, _ = resolve_dtype("auto", torch.device("cpu"))
    if native:
        assert dtype is torch.bfloat16 and all(f in reason for f in native), reason
    else:
        assert dtype is torch.float32 and "no native bf16" in reason, reason


def test_float32_switches_bf16_off_and_cuda_keeps_float16():
    assert resolve_dtype("float32", torch.device("cpu"))[:2] == (torch.float32, "DTYPE=float32")
    assert resolve_dtype("bfloat16", torch.device("cpu")).dtype is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")).dtype is torch.float16


def test_bf16_scores_stay_within_the_documented_bound(model_dir, engine, tokenizer):
    """Engine against engine, the same FastGPT-like lists: float32 (the `engine` fixture) and bf16."""
    rng = random.Random(11)
    lists = [(sentence(rng, 6), documents_of_length(tokenizer, [rng.randint(30, 400) for _ in range(20)], seed=k))
             for k in range(3)]
    bf16 = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype="bfloat16", cpu_backend="torch"))
    try:
        assert bf16.info["dtype"] == "bfloat16" and engine.info["dtype"] == "float32"
        for query, docs in lists:
            ref = 1 / (1 + np.exp(-engine.score(query, docs).logits))
            got = 1 / (1 + np.exp(-bf16.score(query, docs).logits))
            assert 0 < np.max(np.abs(ref - got)) <= SCORE_BOUND
    finally:
        bf16.stop()


def test_the_engine_bounds_the_kernel_caches(monkeypatch):
    """Both per-shape caches get a bound unless the environment set one (Engine.start sets them)."""
    from engine.runtime import KERNEL_CACHE_ENTRIES, bound_kernel_caches

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == KERNEL_CACHE_ENTRIES
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


@pytest.mark.stack
def test_the_stack_says_which_dtype_and_why(stack_env, model_dir, log_dir, api):
    """A worker left at DTYPE=auto announces the machine's choice; the session's DTYPE=float32 one its own.
    (torch's bf16 path: CPU_BACKEND=auto on an AMX CPU is OpenVINO's, tests/test_openvino.py.)"""
    env = {k: v for k, v in stack_env.items() if k != "DTYPE"}
    env.update(MODELS=f"auto-tiny={model_dir}", CPU_BACKEND="torch")
    worker = start_worker("worker-auto-tiny", env, log_dir, "auto-tiny")
    proc, url = None, None
    try:
        proc, url = start_api("api-auto-tiny", env, log_dir)
        headers = {"Authorization": f"Bearer {env['ACCESS_TOKEN'].split(',')[0]}"}
        (card,) = requests.get(url + "/v1/models", headers=headers, timeout=5).json()["data"]
        expected, reason, _ = resolve_dtype("auto", torch.device("cpu"))
        assert card["dtypes"] == [str(expected).removeprefix("torch.")] and card["dtype_reasons"] == [reason]
        info = requests.get(url + "/info", timeout=5).json()
        assert info["model_dtype"] == card["dtypes"][0] and info["dtype_reason"] == reason
        (reference,) = api.session.get(api.url + "/v1/models", headers=headers, timeout=5).json()["data"]
        assert reference["dtypes"] == ["float32"] and reference["dtype_reasons"] == ["DTYPE=float32"]
        assert "dtype" in worker.log_tail(200) and reason in worker.log_tail(200)
    finally:
        if proc is not None:
            proc.stop()
        worker.stop()
