"""What telemetry adds to an app: the request spans and ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.telemetry import TelemetryConfig
from opentelemetry.trace import Tracer

from hosting.contract import Unauthorized, bearer_token, tokens_equal
from hosting.errors import ErrorCode, HostingError
from hosting.telemetry.access import AccessLog
from hosting.telemetry.metrics import PROMETHEUS_CONTENT_TYPE, MetricsExport
from hosting.telemetry.settings import TelemetrySettings
from hosting.telemetry.tracing import RequestSpans

FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
"""FastAPI's own OpenTelemetry stays off: the request spans are ours (:class:`RequestSpans`),
and its per-request look at the global providers cost about 55 us on a relayed turn's path."""


def install_telemetry(app: FastAPI, settings: TelemetrySettings, tracer: Tracer, metrics: MetricsExport,
                      tokens: list[str | None], *, before_scrape: Callable[[], Awaitable[None]] | None = None,
                      off_without_tokens: str | None = None) -> None:
    """Add ``GET /metrics`` (see :func:`metrics_endpoint`), the access log
    (:class:`AccessLog`) and, when spans are exported or logs are JSON, the request
    middleware that gives them their context (with neither, it is left out: a request
    pays nothing for telemetry that is off). The access line is written inside that
    context, so a JSON one carries the request's trace, session and tenant."""
    app.add_api_route("/metrics", metrics_endpoint(metrics, tokens, before=before_scrape,
                                                   off_without_tokens=off_without_tokens),
                      methods=["GET"], include_in_schema=False)
    app.add_middleware(AccessLog, raw_session_ids=settings.raw_session_ids)
    if settings.export_traces or settings.log_format == "json":
        app.add_middleware(RequestSpans, tracer=tracer, raw_session_ids=settings.raw_session_ids,
                           trust_caller=settings.trust_client_trace)


def metrics_endpoint(metrics: MetricsExport, tokens: list[str | None], *,
                     before: Callable[[], Awaitable[None]] | None = None,
                     off_without_tokens: str | None = None) -> Callable[[Request], Awaitable[Response]]:
    """A route answering with ``metrics`` to a bearer of any of ``tokens`` (401 otherwise).
    With none configured it is open, or, given ``off_without_tokens``, answers 404 with
    that hint. ``before`` refreshes values that are read asynchronously. Its refusals are
    :class:`~hosting.errors.HostingError`: the app answers them
    (:func:`hosting.contract.install_error_answers`)."""
    accepted = [token for token in tokens if token]

    async def serve_metrics(request: Request) -> Response:
        if not accepted and off_without_tokens is not None:
            raise HostingError(off_without_tokens, code=ErrorCode.NOT_FOUND)
        if accepted:
            given = bearer_token(request)
            if given is None or not any(tokens_equal(given, token) for token in accepted):
                raise Unauthorized()
        if before is not None:
            await before()
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    return serve_metrics
