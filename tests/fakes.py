"""An API without processes: the real Flask app (create_app) with a dispatcher that answers in-process.

For what the API decides alone (request validation, auth, error shapes, statuses, the options a
route resolves): no Redis, no worker, no gunicorn. Everything else is the real code: the app,
its routes and error handlers, and the Dispatcher's own checks (a model with no live worker is
503, an instruction the workers' heartbeats refuse is 422, a worker's Failure becomes its status).
The Redis it would use listens nowhere, so a route that needs Redis answers 503 as it would with
Redis down. What needs the real parts (scores, jobs, workers) stays in the stack tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from api.app import create_app
from api.dispatch import Dispatcher, check_instruction
from rerank.launch import free_port
from shared.schemas import ScoreOptions, Scored, ScoreReply
from shared.settings import ModelSpec, Settings

TOKENS = ("token-one", "token-two")


def fake_logit(query: str, document: str) -> float:
    """Some logit that depends on the text: longer shared words score higher, empty text scores low."""
    shared = set(query.lower().split()) & set(document.lower().split())
    return float(len(shared) * 2 - 1) + min(len(document), 50) / 100


class FakeWorkers:
    """WorkerRegistry's API side, from a fixed list of heartbeats per model."""

    def __init__(self, workers: dict[str, list[dict[str, Any]]]) -> None:
        self.workers = workers

    def alive(self, model: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        return self.workers.get(model, [])


class FakeDispatcher(Dispatcher):
    """Answers `score` in-process (fake_logit, or the `reply` given); records each call's options."""

    def __init__(self, settings: Settings, workers: dict[str, list[dict[str, Any]]] | None = None,
                 reply: ScoreReply | None = None) -> None:
        super().__init__(settings)
        self.workers = FakeWorkers(workers if workers is not None else
                                   {spec.name: [worker()] for spec in settings.served_models})
        self.reply = reply
        self.calls: list[tuple[str, str, list[str], ScoreOptions]] = []

    def score(self, model: ModelSpec, query: str, documents: Sequence[str], request_id: str,
              options: ScoreOptions | None = None) -> Scored:
        options = options or ScoreOptions()
        check_instruction(model, options, self._require_worker(model))
        self.calls.append((model.name, query, list(documents), options))
        reply = self.reply or ScoreReply(scored=Scored(
            logits=[fake_logit(query, d) for d in documents], input_tokens=sum(len(d) + len(query) for d in documents)))
        return self._unpack(reply)


def worker(**info: Any) -> dict[str, Any]:
    """A heartbeat as worker/context.py describes a worker (the fields the API reads)."""
    return {"id": "fake-1", "model": "tiny", "source": "/nowhere", "max_length": 512, "device": "cpu",
            "dtype": "float32", "backend": "torch_eager", "simulated": False, "capacity": 1e6,
            "pairs_per_second": 100.0, "chars_per_token": 3.0, **info}


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = dict(models="tiny=/nowhere", access_token=",".join(TOKENS), max_documents=64,
                                  max_request_bytes=262144, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    values.update(overrides)
    return Settings(**values)


def app_with(settings_: Settings | None = None, **dispatcher: Any):
    """The real app over a FakeDispatcher; returns (test client, dispatcher)."""
    conf = settings_ or settings()
    fake = FakeDispatcher(conf, **dispatcher)
    return create_app(conf, dispatcher=fake).test_client(), fake


def auth(token: str = TOKENS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
