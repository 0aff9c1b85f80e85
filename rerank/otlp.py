"""A real OTLP/HTTP trace receiver in the test (or benchmark) process, on a loopback port.

It answers `POST /v1/traces` as a collector does and decodes each body with opentelemetry-proto's
`ExportTraceServiceRequest` (the protobuf types the SDK's exporter encodes with), so the tests
read what a collector would get: spans with their trace and parent ids, attributes, links and
the `service.name` of the process that sent them.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)


class Receiver:
    """`with Receiver() as otlp:`; `otlp.endpoint` for OTEL_EXPORTER_OTLP_ENDPOINT; `otlp.spans`.
    `Receiver("grpc")`: the same over OTLP/gRPC (opentelemetry-proto's TraceService)."""

    def __init__(self, protocol: str = "http/protobuf") -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        self.protocol = protocol
        self._grpc = None
        receiver = self
        if protocol == "grpc":
            self._grpc, self._port = self._grpc_server()
            return

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    def _grpc_server(self):
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the service's name
                receiver._take(request)
                return ExportTraceServiceResponse()

        server = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        return server, server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        port = self._port if self._grpc is not None else self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def _take(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(Span(
                        service=resource.get("service.name", ""), name=s.name, trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(), kind=s.kind,
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    ))
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]

    def wait_for(self, predicate, timeout: float = 20.0):
        """Poll until `predicate(self)` is truthy (spans arrive in batches, after a delay)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def __enter__(self) -> Receiver:
        if self._grpc is not None:
            self._grpc.start()
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._grpc is not None:
            self._grpc.stop(1).wait(5)
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


if __name__ == "__main__":  # python -m rerank.otlp: a receiver in a process of its own (bench/tracing.py)
    import sys

    with Receiver() as receiver:
        print(receiver.endpoint, flush=True)
        sys.stdin.read()  # until the caller closes it
        print(len(receiver.spans), flush=True)
