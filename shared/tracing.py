"""OpenTelemetry traces of a call across the API, Redis, the worker and its engine: all set-up here.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: then
nothing of OpenTelemetry is even imported, and every helper below returns a shared do-nothing
object, so a call pays one global lookup per span it would have made. On, each process (a gunicorn
worker after its fork, a Celery worker) calls `setup` once: the SDK reads the standard variables
itself (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_PROTOCOL`, headers,
timeouts, `OTEL_BSP_*`), and the official instrumentations make the spans they exist for: Flask
(the server span, honouring an incoming W3C `traceparent`), Celery (the worker's task span, a
child of the API's publish span through the message's headers) and redis (every command).

Hand-made spans are only where no instrumentation reaches: the API's steps (auth, validation,
admission, the wait), tokenizing, the answer, the piece of a bulk job (linked to the call that
created its job), the API's Celery publish (see `publish`) and the engine's queue wait and forward
pass. The engine process has no OpenTelemetry: it reports when a request's batches ran
(`engine.batcher.Timings`) and the worker turns that into spans with those start and end times.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Paths whose requests make no trace (probes and scrapes), unless OTEL_PYTHON_FLASK_EXCLUDED_URLS says.
EXCLUDED_PATHS = "health,ready,metrics,docs,openapi.json"

_on = False
_pid: int | None = None
_tracer: Any = None


class _Off:
    """What a span helper gives while tracing is off: accepts everything, does nothing."""

    __slots__ = ()

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def set_attribute(self, key: str, value: object) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, object]) -> None:
        pass

    def add_link(self, context: object, attributes: object = None) -> None:
        pass


OFF = _Off()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not disabled."""
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return bool(endpoint) and not disabled and environ.get("OTEL_TRACES_EXPORTER", "otlp").strip() != "none"


def enabled() -> bool:
    return _on


def recording() -> bool:
    """Whether the current span records (tracing on and this call sampled): worth timing for."""
    if not _on:
        return False
    from opentelemetry import trace

    return trace.get_current_span().is_recording()


def setup(service: str, *, celery: bool = False) -> bool:
    """Start tracing in this process if the environment asks for it; True when it is on.

    `service` is the default `service.name` (rerank-api, rerank-worker; OTEL_SERVICE_NAME wins).
    `celery`: instrument Celery's task runs (the worker). Once per process: a fork (gunicorn's
    workers) sets up its own provider, with its own export thread.
    """
    global _on, _pid, _tracer
    if _pid == os.getpid():
        return _on
    _pid = os.getpid()
    _on = wanted()
    if not _on:
        return False
    from opentelemetry import trace
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service})
    exporting = BatchSpanProcessor(_exporter())
    provider = TracerProvider(resource=resource)  # its sampler from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(exporting)
    trace.set_tracer_provider(provider)
    # Redis commands are traced inside a traced call only: outside one they are the heartbeats,
    # the Celery consumer's BRPOP ten times a second and cached reads, each a trace of one span.
    # Hence a provider of their own that starts no trace (ParentBased, root off), same exporter.
    quiet = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
    quiet.add_span_processor(exporting)
    RedisInstrumentor().instrument(tracer_provider=quiet)
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
    _tracer = trace.get_tracer("rerank")
    log.info("tracing on: OTLP over %s to %s", _protocol(),
             os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def shutdown() -> None:
    """Send what is still buffered (a process about to exit; the SDK also does it at exit)."""
    if _on:
        from opentelemetry import trace

        trace.get_tracer_provider().shutdown()


def _protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").strip()


def _exporter():
    """The SDK's OTLP exporter for the protocol asked for; it reads endpoint, headers and timeout itself."""
    protocol = _protocol()
    if protocol == "grpc":
        _grpc_under_gevent()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: this service exports 'grpc' or 'http/protobuf'")
    return OTLPSpanExporter()


def _grpc_under_gevent() -> None:
    """gRPC's C core blocks the whole gevent hub unless told about gevent first (the API's
    gunicorn workers run under gevent: api/http_worker.py); grpc's documented switch."""
    try:
        from gevent import monkey
    except ImportError:
        return
    if monkey.is_module_patched("socket"):
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()


# --- what the code calls --------------------------------------------------------------------------------------


def instrument_flask(app) -> None:
    """The Flask server span of every request (its incoming `traceparent` honoured, its trace
    named in the answer's `traceresponse` header), probes excluded."""
    if not _on:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.propagators import TraceResponsePropagator, set_global_response_propagator

    # The answer's `traceresponse` header names the call's trace: for the client, and for the
    # access log line (api/gunicorn.conf.py), which is written after the request's span ended.
    set_global_response_propagator(TraceResponsePropagator())
    excluded = os.environ.get("OTEL_PYTHON_FLASK_EXCLUDED_URLS", EXCLUDED_PATHS)
    FlaskInstrumentor().instrument_app(app, excluded_urls=excluded)


def span(name: str, attributes: Mapping[str, Any] | None = None):
    """A child span of the current one, as a context manager (OFF while tracing is off)."""
    if not _on:
        return OFF
    return _tracer.start_as_current_span(name, attributes=attributes)


def current():
    """The span in progress (OFF while tracing is off), to add attributes to."""
    if not _on:
        return OFF
    from opentelemetry import trace

    return trace.get_current_span()


def trace_id() -> str:
    """The current trace's id (32 hex digits), or '' outside a trace or with tracing off."""
    if not _on:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def traceparent() -> str:
    """The current span as a W3C `traceparent` value (to link work done later to it), or ''."""
    if not _on:
        return ""
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")


def link_to(value: str, **attributes: Any) -> None:
    """Link the current span to the span a `traceparent` value names (a job's creating call)."""
    if not _on or not value:
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": value}))
    if context.get_span_context().is_valid:
        trace.get_current_span().add_link(context.get_span_context(), attributes or None)


@contextlib.contextmanager
def publish(task_name: str, task_id: str, queue: str, *, direct: bool = False) -> Iterator[dict[str, str] | None]:
    """The producer span of a call the API sends; yields the headers to send with it.

    A Celery message (`direct=False`): hand-made because the Celery instrumentation ends its
    publish span only for a task registered in the sending process (its after_publish handler
    returns early otherwise, leaving the span open and attached:
    open-telemetry/opentelemetry-python-contrib#609), and the API sends tasks by name. Same name
    and attributes as the instrumentation's; the worker's instrumented task span becomes its child
    through `traceparent` in the message's headers. A call on the direct path's list
    (`direct=True`): `publish/<task>`, and the worker's `process/<task>` span (`consume`) is its child.
    """
    if not _on:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    if direct:
        name, attributes = f"publish/{task_name}", {"messaging.system": "redis", "messaging.operation": "publish"}
    else:
        name, attributes = f"apply_async/{task_name}", {"celery.action": "apply_async", "celery.task_name": task_name,
                                                        "messaging.system": "celery"}
    attributes.update({"messaging.message.id": task_id, "messaging.destination.name": queue})
    with _tracer.start_as_current_span(name, kind=trace.SpanKind.PRODUCER, attributes=attributes):
        headers: dict[str, str] = {}
        inject(headers)
        yield headers


def consume(task_name: str, traceparent: str | None, attributes: Mapping[str, Any]):
    """The worker's span of a call taken from the direct path's list: a consumer span, child of
    the API's `publish/<task>` span named by `traceparent` (OFF while tracing is off)."""
    if not _on:
        return OFF
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent} if traceparent else {})
    return _tracer.start_as_current_span(f"process/{task_name}", context=parent, kind=trace.SpanKind.CONSUMER,
                                         attributes={"messaging.system": "redis", "messaging.operation": "process",
                                                     **attributes})


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Run a block outside the current trace (bulk pieces sent after another piece: each piece is
    a trace of its own, linked to its job's creating call, not a child of whatever sent it)."""
    if not _on:
        yield
        return
    from opentelemetry import context

    token = context.attach(context.Context())
    try:
        yield
    finally:
        context.detach(token)


def engine_spans(submitted: float, timings, **attributes: Any) -> None:
    """The engine's queue wait and forward pass of one request, as children of the current span.

    `submitted`: when the worker handed the request to the engine (time.time()); `timings`: what
    the engine reported (engine.batcher.Timings: wall-clock times of its first batch's launch and
    its last batch's logits, and the batches it rode in). Both clocks are the host's wall clock."""
    if not _on or timings is None or not timings.started:
        return
    ns = 1_000_000_000
    queue = _tracer.start_span("engine.queue", start_time=int(submitted * ns), attributes=attributes)
    queue.end(end_time=int(max(timings.started, submitted) * ns))
    forward = _tracer.start_span("engine.forward", start_time=int(timings.started * ns), attributes={
        **attributes,
        "rerank.batch.count": timings.batches,
        "rerank.batch.size": timings.rows,
        "rerank.batch.tokens": timings.padded_tokens,
        "rerank.batch.real_tokens": timings.real_tokens,
    })
    forward.end(end_time=int(max(timings.finished, timings.started) * ns))
