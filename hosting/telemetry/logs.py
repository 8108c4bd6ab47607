"""One logging set-up for the server and the gateway: readable text, or one JSON object a line.

``AGENT_LOG_FORMAT=json`` makes every line a JSON object with ``time``, ``level``,
``logger`` and ``message``, and, inside a request or a turn, ``session`` (hashed unless
raw ids were asked for), ``tenant`` (gateway), ``trace_id`` and ``span_id``, so a log
search can start from a trace and the other way round. Formatting is
``python-json-logger``'s; this module only adds the request's fields to each record.
"""

from __future__ import annotations

import logging

from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from hosting.telemetry.settings import LogFormat
from hosting.telemetry.tracing import request_context

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RequestFields(logging.Filter):
    """Adds the current request's session, tenant and trace to a record (JSON only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = request_context.get()
        if context is not None:
            if context.session is not None:
                record.session = context.session
            if context.tenant is not None:
                record.tenant = context.tenant
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        return True


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Replace the root logger's handlers with one on stderr in ``log_format``."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                                           # uvicorn's copy of each message with terminal colours
                                           reserved_attrs=[*RESERVED_ATTRS, "color_message"]))
        handler.addFilter(RequestFields())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request it sends at INFO: for the gateway one line per relayed request and
    # per readiness probe, beside uvicorn's access line for the request that caused it.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
