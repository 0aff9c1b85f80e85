"""Shared fixtures: a tiny random reranker saved to disk, and a real stack serving it.

Built once per session: the model folder (through `save_pretrained`), a Redis of our own on a free
loopback port, one Celery worker process, and gunicorn APIs with different settings. Every
process started here is stopped at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.procs import Proc, base_env, start_api, start_redis, start_worker

TOKENS = ("token-one", "token-two")


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> Iterator[Path]:
    """DATA_DIR of every process the tests start (job folders, launcher Redis data): a temporary
    folder, never the checkout's data/. Set in the environment, which tests/procs.base_env copies."""
    path = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_DIR", str(path))
        mp.delenv("JOBS_URL", raising=False)
        yield path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from rerank.random_model import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3ForCausalLM with a BPE carrying Qwen's special tokens: a Qwen3-Reranker folder."""
    from rerank.random_model import build_model

    return build_model(tmp_path_factory.mktemp("models") / "qwen3-tiny", "qwen3-tiny")


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory) -> Path:
    """A tiny random GemmaForCausalLM (`<bos>`, `Yes` as one token): a bge-reranker-v2-gemma stand-in."""
    from rerank.random_model import build_model

    return build_model(tmp_path_factory.mktemp("models") / "gemma-tiny", "gemma-tiny")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The tiny model's tokenizer as transformers loads it (to build texts of given token counts)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def engine(model_dir) -> Iterator:
    """The tiny model behind the real engine, in-process (the worker runs the same in a process), in
    float32: the reference path the scores are compared with (DTYPE=auto: tests/test_cpu_dtype.py)."""
    from engine import Engine, EngineConfig

    started = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype="float32"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_url(log_dir) -> Iterator[str]:
    """A Redis of the tests' own (TEST_REDIS_URL uses an existing one instead)."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    proc, url = start_redis(log_dir)
    yield url
    proc.stop()


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    api: Proc
    session: requests.Session

    def post(self, path: str, body=None, *, token: str | None = TOKENS[0], **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        if body is not None and "data" not in kwargs:
            kwargs["json"] = body
        return self.session.post(self.url + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def stack_env(model_dir, redis_url) -> dict[str, str]:
    return base_env(
        REDIS_URL=redis_url,
        MODELS=f"tiny={model_dir}",
        ACCESS_TOKEN=",".join(TOKENS),
        SYNC_TIMEOUT="4",
        MAX_DOCUMENTS="64",
        MAX_REQUEST_BYTES="262144",
        HEARTBEAT_INTERVAL="0.5",
        WORKER_CONCURRENCY="8",
        MAX_CHUNKS="32",
        TORCH_THREADS="1",
        DTYPE="float32",  # the reference path, scores compared to 1e-6; DTYPE=auto: tests/test_cpu_dtype.py
        LOG_LEVEL="INFO",
    )


@pytest.fixture(scope="session")
def worker(stack_env, log_dir) -> Iterator[Proc]:
    """The warm worker of model `tiny`, for the whole session."""
    proc = start_worker("worker-tiny", stack_env, log_dir, "tiny")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api(stack_env, worker, log_dir) -> Iterator[Stack]:
    """gunicorn serving `tiny` behind two tokens: FastGPT's set-up."""
    proc, url = start_api("api", stack_env, log_dir)
    with requests.Session() as session:
        yield Stack(url, stack_env, proc, session)
    proc.stop()


@pytest.fixture(scope="session")
def multi_api(stack_env, model_dir, worker, log_dir) -> Iterator[Stack]:
    """gunicorn serving `tiny` and `spare` (no worker unless a test starts one), open: no token."""
    env = {k: v for k, v in stack_env.items() if k != "ACCESS_TOKEN"}
    env.update(MODELS=f"tiny={model_dir},spare={model_dir}", SYNC_TIMEOUT="3")
    proc, url = start_api("api-multi", env, log_dir)
    with requests.Session() as session:
        yield Stack(url, env, proc, session)
    proc.stop()


@pytest.fixture(scope="session")
def small_pieces_api(multi_api, log_dir) -> Iterator[Stack]:
    """multi_api's models and settings, but jobs cut into pieces of 200 pairs (JOB_PIECE_PAIRS; the
    API cuts them): for tests that stop a worker between pieces. By default a piece holds about a
    second of the engine's work, and the tiny model does those tests' whole jobs in less."""
    env = dict(multi_api.env, JOB_PIECE_PAIRS="200")
    proc, url = start_api("api-small-pieces", env, log_dir)
    with requests.Session() as session:
        yield Stack(url, env, proc, session)
    proc.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    """After a run that included tests/test_hardening.py: its figures, as one table."""
    import sys

    module = sys.modules.get("tests.test_hardening")
    figures = getattr(module, "FIGURES", None)
    if not figures:
        return
    terminalreporter.section("hardening summary: what was tried, how much, what came out")
    for f in figures:
        terminalreporter.write_line(f"[{f['area']}] {f['tried']}")
        terminalreporter.write_line(f"    amount:  {f['amount']}")
        terminalreporter.write_line(f"    outcome: {f['outcome']}")
