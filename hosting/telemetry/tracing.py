"""Spans: one per HTTP request and one per turn, joined across processes by ``traceparent``.

With no OTLP endpoint configured the process uses OpenTelemetry's no-op tracer: no
provider, no span processor, no exporter thread, and the request middleware is not
installed at all, so a request pays nothing. With one, spans are batched and sent by
the SDK's OTLP/HTTP exporter, which reads the standard ``OTEL_EXPORTER_OTLP_*``
variables itself; the sampler comes from ``OTEL_TRACES_SAMPLER`` the same way.

No span carries a prompt, an answer or a token: attributes are ids (hashed, see
:func:`session_label`), counts, numbers and error codes only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hosting.telemetry.settings import TelemetrySettings

SESSION_PATH = re.compile(r"^/sessions/([^/]+)(/[^/]*)?$")


def session_label(session_id: str, raw: bool = False) -> str:
    """How a session id appears in spans, logs and metrics: ``sha256:`` and the first 16
    hex digits of its SHA-256 (the same in every process, so a trace and a log line can
    be matched), or the id itself when the operator asked for raw ids."""
    if raw:
        return session_id
    return "sha256:" + hashlib.sha256(session_id.encode()).hexdigest()[:16]


@dataclass
class RequestContext:
    """What the log lines of one request carry besides its trace: the session (as
    labelled) and the tenant, filled in as the request learns them."""

    raw_session_ids: bool = False
    session: str | None = None
    tenant: str | None = None


def tag_session(session_id: str) -> None:
    """Name the session of a request whose path does not (``POST /runtime/advance``)."""
    context = request_context.get()
    if context is not None:
        context.session = session_label(session_id, context.raw_session_ids)
        trace.get_current_span().set_attribute("agent.session", context.session)


request_context: ContextVar[RequestContext | None] = ContextVar("request_context", default=None)


def open_tracer(settings: TelemetrySettings) -> tuple[Tracer, Callable[[], None]]:
    """The process's tracer and how to flush it at exit: a batching OTLP exporter when
    configured, else the no-op tracer (and nothing to flush)."""
    if not settings.export_traces:
        return UntracedTracer(), lambda: None
    # Imported only when exporting, so a process without an endpoint never loads the SDK's exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("hosting"), provider.shutdown


class UntracedTracer(trace.NoOpTracer):
    """OpenTelemetry's no-op tracer, minus its cost where it does nothing: with no span
    current (no caller's trace to carry on), a span started as current is
    :data:`~opentelemetry.trace.INVALID_SPAN` and the context is left alone. The no-op
    tracer builds a generator and switches the context for each such span: 50-90 us
    per span on a relayed turn's path (bench/README.md, the relay). With a caller's
    trace current (JSON logs: :class:`RequestSpans`), it behaves as the no-op tracer."""

    def start_as_current_span(self, name: str, context: Context | None = None,  # type: ignore[override]
                              *args: Any, **kwargs: Any) -> AbstractContextManager[Span]:
        if context is None and not trace.get_current_span().get_span_context().is_valid:
            return nullcontext(trace.INVALID_SPAN)
        return super().start_as_current_span(name, context, *args, **kwargs)


def inject_trace_context(headers: MutableMapping[str, str]) -> None:
    """Add the current trace's ``traceparent`` (and baggage) to outgoing headers; nothing
    when no span is current (tracing off and no caller's trace)."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


def labelled_path(path: str, raw: bool) -> str:
    """``/sessions/abc/messages`` with its session id as :func:`session_label` gives it."""
    match = SESSION_PATH.match(path)
    if match is None:
        return path
    return f"/sessions/{session_label(match.group(1), raw)}{match.group(2) or ''}"


def _route_of(path: str) -> tuple[str, str | None]:
    """``/sessions/abc/messages`` → (``/sessions/{session_id}/messages``, ``abc``): span
    names and attributes never carry a raw session id."""
    match = SESSION_PATH.match(path)
    if match is None:
        return path, None
    return f"/sessions/{{session_id}}{match.group(2) or ''}", match.group(1)


class RequestSpans:
    """ASGI middleware: a server span per HTTP request, current while the request runs
    (dependencies, the route, and a streamed body to its end), with a
    :class:`RequestContext` for the logs.

    A trusted caller's trace is continued (``traceparent``, and its ``baggage`` goes on
    to whatever the request calls). An untrusted one's (``trust_caller`` false: the
    gateway's tenants) is not: the span starts a trace of its own, with a link to the
    caller's span, so one tenant can neither join nor pollute another's traces, and the
    caller's baggage is dropped, so it never reaches a sandbox.

    Pure ASGI rather than ``opentelemetry-instrumentation-asgi``: that one names spans
    after raw paths and adds a span per message sent, which would put session ids in
    span names and a span per SSE event in every trace."""

    def __init__(self, app: ASGIApp, tracer: Tracer, raw_session_ids: bool, trust_caller: bool = True) -> None:
        self.app = app
        self.tracer = tracer
        self.raw = raw_session_ids
        self.trust_caller = trust_caller

    def _parent(self, headers: Mapping[str, str]) -> tuple[Context, list[Link]]:
        """The context the request's span starts in, and its links (see the class doc)."""
        caller = propagate.extract(headers)
        if self.trust_caller:
            return caller, []
        caller_span = trace.get_current_span(caller).get_span_context()
        return Context(), [Link(caller_span)] if caller_span.is_valid else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, session_id = _route_of(scope["path"])
        headers: Mapping[str, str] = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        context = RequestContext(self.raw, session_label(session_id, self.raw) if session_id else None)
        token = request_context.set(context)
        method = scope["method"]
        parent, links = self._parent(headers)
        # Current for the whole request, not only as the span's parent: the span alone would
        # carry the trace on, but not the baggage.
        attached = otel_context.attach(parent)
        try:
            with self.tracer.start_as_current_span(f"{method} {route}", context=parent, kind=SpanKind.SERVER,
                                                   links=links) as span:
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", route)
                if context.session is not None:
                    span.set_attribute("agent.session", context.session)

                async def traced_send(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        status = int(message["status"])
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            span.set_status(Status(StatusCode.ERROR))
                    await send(message)

                await self.app(scope, receive, traced_send)
                if context.tenant is not None:
                    span.set_attribute("agent.tenant", context.tenant)
        finally:
            otel_context.detach(attached)
            request_context.reset(token)
