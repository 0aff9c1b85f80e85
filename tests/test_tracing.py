"""OpenTelemetry traces across the queue, read by a real OTLP receiver in the test process
(rerank/otlp.py decodes opentelemetry-proto's ExportTraceServiceRequest): a traced call is one
trace from the API's request span through the Celery publish to the worker's task and the
engine's queue wait and forward pass; an incoming `traceparent` is honoured; a bulk piece is a
span linked to the call that created its job; and with tracing off nothing is sent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from rerank.otlp import Receiver
from tests.procs import ROOT, base_env, start_api, start_worker, wait_for


SERVER, PRODUCER, CONSUMER = 2, 4, 5  # opentelemetry-proto's Span.SpanKind values


@pytest.fixture(scope="module")
def otlp() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def traced_env(stack_env: dict, model_dir, otlp: Receiver, **extra: str) -> dict:
    return dict(stack_env, MODELS=f"traced={model_dir}", OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
                OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_BSP_SCHEDULE_DELAY="100", **extra)


@pytest.fixture(scope="module")
def traced(stack_env, model_dir, otlp, log_dir) -> Iterator[tuple[str, dict]]:
    """An API and a worker (model `traced`) exporting to the receiver."""
    env = traced_env(stack_env, model_dir, otlp)
    worker = start_worker("worker-traced", env, log_dir, "traced")
    api, url = start_api("api-traced", env, log_dir)
    try:
        yield url, env
    finally:
        api.stop()
        worker.stop()


def post(url: str, path: str, body: dict, **headers: str) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30,
                         headers={"Authorization": "Bearer token-one", **headers})


def by_name(spans) -> dict:
    found: dict = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),  # no endpoint: off
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "True"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),  # Compose's ${VAR:-} when unset
])
def test_tracing_is_on_only_when_an_endpoint_is_given(environ, on):
    from shared.tracing import wanted

    assert wanted(environ) is on


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "engine-process"])
def test_the_engine_reports_when_a_timed_request_ran(model_dir, process):
    """What the worker builds its engine spans from: asked for, the times and sizes of the batches
    a request rode in (over the engine process's pipe too); not asked for, nothing."""
    from engine import Engine, EngineConfig

    scorer = Engine.start(EngineConfig(source=str(model_dir), device="cpu", torch_threads=1, max_batch_tokens=256),
                          process=process)
    try:
        encoded = scorer.encoder.encode("a query", [f"document number {i} " * 3 for i in range(40)])
        plain = scorer.submit(encoded)
        submitted = time.time()
        timed = scorer.submit(encoded, timed=True)
        logits = timed.wait(30)
        assert np.allclose(plain.wait(30), logits, atol=1e-4) and plain.timings is None
        t = timed.timings
        assert submitted <= t.started < t.finished <= time.time()
        assert t.batches >= 2  # 40 pairs do not fit one batch of 256 padded tokens
        assert t.real_tokens >= encoded.tokens and t.padded_tokens >= t.real_tokens and t.rows >= encoded.pairs
    finally:
        scorer.stop()


@pytest.mark.stack
def test_a_call_is_one_trace_from_the_api_through_the_queue_to_the_engine(traced, otlp, log_dir):
    url, _ = traced
    r = post(url, "/v1/rerank", {"model": "traced", "query": "where is the queue",
                                 "documents": ["the queue is in redis", "bananas", "a third one"]})
    assert r.status_code == 200, r.text
    rid = r.headers["X-Request-Id"]
    (server,) = otlp.wait_for(lambda o: [s for s in o.named("POST /v1/rerank")
                                         if s.attributes.get("rerank.request_id") == rid])
    expected = {"POST /v1/rerank", "rerank.auth", "rerank.validate", "rerank.admission",
                "publish/rerank.realtime", "rerank.wait", "process/rerank.realtime", "rerank.tokenize",
                "engine.queue", "engine.forward", "rerank.reply", "rerank.answer"}
    spans = otlp.wait_for(lambda o: expected <= set(by_name(o.trace(server.trace_id))) and o.trace(server.trace_id))
    named = by_name(spans)
    assert expected <= set(named), sorted(set(named))
    one = {name: found[0] for name, found in named.items()}

    # Both processes took part, under one trace id; each span hangs where it happened.
    assert {s.service for s in spans} == {"rerank-api", "rerank-worker"}
    assert server.kind == SERVER and server.parent_id == ""
    for name in ("rerank.auth", "rerank.validate", "rerank.admission", "rerank.wait", "rerank.answer"):
        assert one[name].service == "rerank-api" and one[name].parent_id == server.span_id, name
    publish, run = one["publish/rerank.realtime"], one["process/rerank.realtime"]
    # Admitted and queued in one Redis script: the publish is part of the admission step.
    assert publish.service == "rerank-api" and publish.parent_id == one["rerank.admission"].span_id
    assert publish.kind == PRODUCER and publish.attributes["messaging.message.id"].startswith(rid)
    assert run.service == "rerank-worker" and run.kind == CONSUMER and run.parent_id == publish.span_id
    assert run.attributes["rerank.request_id"] == rid
    for name in ("rerank.tokenize", "engine.queue", "engine.forward", "rerank.reply"):
        assert one[name].service == "rerank-worker" and one[name].parent_id == run.span_id, name
    # Redis commands inside the call are children of the step that made them (BLPOP of the wait,
    # the reply's pipeline), and none made outside a call starts a trace of its own.
    assert any(s.parent_id == one["rerank.wait"].span_id and "BLPOP" in s.name for s in spans)
    assert any(s.parent_id == one["rerank.reply"].span_id for s in spans)
    assert all(s.parent_id for s in otlp.spans if s.attributes.get("db.system") == "redis")

    # The engine's spans carry its timings, in order: queued, then the forward pass of its batch.
    tokenize, queue, forward = one["rerank.tokenize"], one["engine.queue"], one["engine.forward"]
    assert tokenize.attributes["rerank.pairs"] == 3 and tokenize.attributes["rerank.tokens"] > 3
    assert forward.attributes["rerank.batch.size"] >= 3 and forward.attributes["rerank.batch.count"] >= 1
    assert forward.attributes["rerank.batch.tokens"] >= forward.attributes["rerank.batch.real_tokens"] \
        >= tokenize.attributes["rerank.tokens"]
    assert tokenize.end_ns <= queue.start_ns <= queue.end_ns <= forward.start_ns < forward.end_ns
    assert forward.end_ns <= one["rerank.reply"].start_ns <= run.end_ns
    # (the worker's span may end after the API answered: its answer's RPUSH wakes the API before it returns)
    # The reply's span starts inside the call; it may end just after the API has answered (the
    # worker's RPUSH returns after the API's BLPOP already woke), so its start is what is ordered.
    assert server.start_ns <= publish.start_ns < run.start_ns and one["rerank.reply"].start_ns <= server.end_ns
    assert one["rerank.wait"].end_ns <= one["rerank.answer"].start_ns

    # The trace id is in both processes' log lines, beside the request id.
    lines = [line for name in ("api-traced", "worker-traced")
             for line in (log_dir / f"{name}.log").read_text().splitlines() if f"rid={rid}" in line]
    assert any(f"trace=00-{server.trace_id}-" in line for line in lines if "/v1/rerank" in line), lines  # access log
    assert any(f"trace={server.trace_id}" in line and "scored" in line for line in lines), lines  # the worker's
    assert r.headers["traceresponse"].startswith(f"00-{server.trace_id}-")


@pytest.mark.stack
def test_an_incoming_traceparent_is_honoured(traced, otlp):
    """Its trace is continued, and its sampling decision followed (the default parent-based sampler):
    a call whose client did not sample it records nothing, in the API or the worker."""
    url, _ = traced
    unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
    r = post(url, "/v2/rerank", {"model": "traced", "query": "q", "documents": ["a", "b"]},
             traceparent=f"00-{unsampled}-00f067aa0ba902b7-00")
    assert r.status_code == 200, r.text
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = post(url, "/v2/rerank", {"model": "traced", "query": "q", "documents": ["a", "b"]},
             traceparent=f"00-{trace_id}-{parent}-01")
    assert r.status_code == 200, r.text
    spans = otlp.wait_for(lambda o: {"POST /v2/rerank", "engine.forward"} <= set(by_name(o.trace(trace_id)))
                          and o.trace(trace_id))
    (server,) = by_name(spans)["POST /v2/rerank"]
    assert server.parent_id == parent
    assert {s.service for s in spans} == {"rerank-api", "rerank-worker"}
    time.sleep(0.5)  # the later call's spans are in: the earlier one's would be too
    assert otlp.trace(unsampled) == []


@pytest.mark.stack
def test_each_bulk_piece_is_a_span_linked_to_the_call_that_created_its_job(traced, otlp):
    url, env = traced
    lines = [json.dumps({"id": i, "query": f"query {i}", "documents": [f"doc {i} {j}" for j in range(4)]})
             for i in range(6)]
    r = requests.post(url + "/v1/rerank/jobs?model=traced", data="\n".join(lines).encode(), timeout=30,
                      headers={"Content-Type": "application/jsonl", "Authorization": "Bearer token-one"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    wait_for(lambda: requests.get(f"{url}/v1/rerank/jobs/{job}", timeout=5,
                                  headers={"Authorization": "Bearer token-one"}).json()["status"] == "succeeded",
             60, "the job")
    (created,) = otlp.wait_for(lambda o: [s for s in o.named("POST /v1/rerank/jobs")
                                          if s.attributes.get("rerank.request_id") == r.headers["X-Request-Id"]])
    pieces = otlp.wait_for(lambda o: [s for s in o.named("rerank.piece") if s.attributes["rerank.job_id"] == job])
    assert pieces and all(p.service == "rerank-worker" for p in pieces)
    for piece in pieces:
        assert piece.links == [(created.trace_id, created.span_id)]
        assert piece.trace_id != created.trace_id  # a trace of its own, not a child of the upload
        assert piece.attributes["rerank.outcome"] == "done" and piece.attributes["rerank.pairs"] == 24
        inside = by_name(s for s in otlp.trace(piece.trace_id) if s.parent_id == piece.span_id)
        assert {"rerank.tokenize", "engine.queue", "engine.forward"} <= set(inside), sorted(inside)


@pytest.mark.stack
def test_otlp_over_grpc_from_the_gevent_api(traced, otlp, log_dir):
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the API (gunicorn's gevent workers) exports over gRPC;
    its spans and the worker's (over HTTP) are still one trace."""
    _, env = traced
    with Receiver("grpc") as grpc_otlp:
        api, url = start_api("api-traced-grpc", dict(env, OTEL_EXPORTER_OTLP_ENDPOINT=grpc_otlp.endpoint,
                                                      OTEL_EXPORTER_OTLP_PROTOCOL="grpc"), log_dir)
        try:
            r = post(url, "/v1/rerank", {"model": "traced", "query": "q", "documents": ["a", "b", "c"]})
            assert r.status_code == 200, r.text
            rid = r.headers["X-Request-Id"]
            (server,) = grpc_otlp.wait_for(lambda o: [s for s in o.named("POST /v1/rerank")
                                                      if s.attributes.get("rerank.request_id") == rid])
            assert server.service == "rerank-api"
            assert grpc_otlp.wait_for(lambda o: "publish/rerank.realtime" in by_name(o.trace(server.trace_id)))
            (run,) = otlp.wait_for(lambda o: by_name(o.trace(server.trace_id)).get("process/rerank.realtime"))
            assert run.service == "rerank-worker"
            # Still answering after an export (gRPC under gevent blocks nothing).
            assert post(url, "/v1/rerank", {"model": "traced", "query": "q", "documents": ["a"]}).status_code == 200
        finally:
            api.stop()


@pytest.mark.stack
def test_with_tracing_off_nothing_is_sent(stack_env, model_dir, log_dir, otlp):
    """OTEL_SDK_DISABLED beside an endpoint: calls and a job are served, the receiver hears nothing;
    and without an endpoint neither side loads the SDK's tracing, an exporter or an instrumentation
    (redis-py imports OpenTelemetry's metrics API by itself once it is installed: not ours)."""
    env = traced_env(stack_env, model_dir, otlp, OTEL_SDK_DISABLED="true")
    env["MODELS"] = f"untraced={model_dir}"
    before = otlp.requests
    worker = start_worker("worker-untraced", env, log_dir, "untraced")
    api, url = start_api("api-untraced", env, log_dir)
    try:
        for _ in range(3):
            r = post(url, "/v1/rerank", {"model": "untraced", "query": "q", "documents": ["a", "b"]},
                     traceparent="00-4bf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b7-01")
            assert r.status_code == 200, r.text
    finally:
        api.stop()
        worker.stop()
    time.sleep(0.5)  # past the exporters' schedule delay, had they existed
    assert otlp.requests == before
    assert not re.search(r"trace=[0-9a-f]{32}", (log_dir / "api-untraced.log").read_text())

    plain = {k: v for k, v in base_env(MODELS=f"tiny={model_dir}").items() if not k.startswith("OTEL_")}
    code = ("import sys, worker.tasks, worker.realtime, worker.jobs; from api.app import create_app; create_app(); "
            "from shared import tracing; assert tracing.setup('x', celery=True) is False; "
            "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter', "
            "'opentelemetry.instrumentation'))]; print(loaded); sys.exit(bool(loaded))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=plain, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
