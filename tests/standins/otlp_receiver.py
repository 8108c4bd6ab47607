"""A real OTLP/HTTP receiver for the tests: protobuf in, decoded spans and metrics out.

It speaks the two calls the OTLP/HTTP exporters make (``POST /v1/traces`` and
``POST /v1/metrics``, ``application/x-protobuf``, optionally gzip) and decodes them with
``opentelemetry-proto``. Any other call is answered 404 and recorded in ``unexpected``,
which the tests assert is empty: a receiver that quietly accepted anything would hide
an exporter sending somewhere else.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _point_value(point: Any) -> float:
    """A sum's or gauge's value; a histogram's count."""
    if point.DESCRIPTOR.name == "NumberDataPoint":
        return float(getattr(point, point.WhichOneof("value")))
    return float(point.count)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...] = ()
    """(trace id, span id) of each span it links to."""


@dataclass(frozen=True)
class ReceivedMetric:
    service: str
    name: str
    points: list[dict[str, Any]]


@dataclass
class OtlpReceiver:
    """Serves on 127.0.0.1; ``endpoint`` is what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: list[ReceivedMetric] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.headers.get("content-type") != "application/x-protobuf":
                    receiver._refuse(self, f"content-type {self.headers.get('content-type')!r} on {self.path}")
                elif self.path == "/v1/traces":
                    receiver._traces(body)
                    self._answer(ExportTraceServiceResponse().SerializeToString())
                elif self.path == "/v1/metrics":
                    receiver._metrics(body)
                    self._answer(ExportMetricsServiceResponse().SerializeToString())
                else:
                    receiver._refuse(self, f"POST {self.path}")

            def do_GET(self) -> None:  # noqa: N802
                receiver._refuse(self, f"GET {self.path}")

            def _answer(self, payload: bytes) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _refuse(self, handler: BaseHTTPRequestHandler, what: str) -> None:
        with self._lock:
            self.unexpected.append(what)
        handler.send_response(404)
        handler.send_header("content-length", "0")
        handler.end_headers()

    def _traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes).get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        links = tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links)
                        self.spans.append(ReceivedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                                       span.parent_span_id.hex(), _attributes(span.attributes), links))

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        with self._lock:
            for resource_metrics in request.resource_metrics:
                service = _attributes(resource_metrics.resource.attributes).get("service.name", "")
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        data = getattr(metric, metric.WhichOneof("data"))
                        points = [{"attributes": _attributes(p.attributes), "value": _point_value(p)}
                                  for p in data.data_points]
                        self.metrics.append(ReceivedMetric(service, metric.name, points))

    def wait_for_spans(self, predicate: Any, timeout: float = 30) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` holds; fail with what arrived otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not received within {timeout} s; got {[(s.service, s.name) for s in spans]}")
            time.sleep(0.1)
