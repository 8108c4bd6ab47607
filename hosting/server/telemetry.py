"""The agent server's telemetry: its spans, its metrics and what ``GET /metrics`` shows.

A turn's observer reads the turn's events like any client (a turn's events can be read by
several readers at once, see :mod:`hosting.server.turns`) but in a task of its own, so
the span and the counts are complete even when the client went away mid-turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from hosting.errors import HostingError
from hosting.server.turns import Turn
from hosting.telemetry.http import install_telemetry
from hosting.telemetry.metrics import MetricsExport
from hosting.telemetry.settings import TelemetrySettings
from hosting.telemetry.tracing import open_tracer, session_label
from hosting.telemetry.turns import TurnMetrics, TurnRecord

SESSION_GAUGES = {
    "agent.live_sessions": ("live_sessions", "Sessions with a connected CLI (warm or running a turn)"),
    "agent.running_turns": ("running_turns", "Turns running now"),
    "agent.prestarted_clis": ("prewarmed", "Pre-started CLIs waiting for a new session"),
    "agent.queued_turns": ("queued_turns", "Turns waiting for room for their CLI"),
}


class TurnObserver:
    """Starts a turn's span before the turn is admitted and follows the turn to ``done``."""

    def __init__(self, tracer: Tracer, metrics: TurnMetrics, model: str, raw_session_ids: bool) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._model = model
        self._raw = raw_session_ids
        self._following: set[asyncio.Task[None]] = set()

    @contextmanager
    def starting(self, session_id: str) -> Iterator[TurnStart]:
        """Wrap the admission of a turn: the span is current meanwhile (the turn's task,
        created inside, inherits it, and so do its log lines); a refusal (a
        :class:`HostingError`) is counted under its code and ends the span; else
        :meth:`TurnStart.follow` hands the started turn over."""
        span = self._tracer.start_span("agent.turn", attributes={
            "agent.session": session_label(session_id, self._raw), "gen_ai.request.model": self._model})
        start = TurnStart(self, span, TurnRecord(time.monotonic()))
        try:
            with trace.use_span(span, end_on_exit=False):
                yield start
        except HostingError as exc:
            code = exc.code.value
            self._metrics.turns.add(1, {"outcome": "refused", "error_code": code})
            span.set_attribute("agent.outcome", "refused")
            span.set_attribute("agent.error_code", code)
            span.set_status(Status(StatusCode.ERROR, code))
            span.end()
            raise
        except BaseException:
            span.end()
            raise
        if not start.followed:
            span.end()

    def follow(self, turn: Turn, span: Span, record: TurnRecord) -> None:
        task = asyncio.create_task(self._watch(turn, span, record), name=f"observe:{turn.session_id}")
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _watch(self, turn: Turn, span: Span, record: TurnRecord) -> None:
        try:
            async for numbered in turn.events():
                record.see(numbered.event)
            record.record(self._metrics, span)
        finally:
            span.end()


@dataclass
class TurnStart:
    """A turn being admitted: its span, and how to follow it once it started."""

    observer: TurnObserver
    span: Span
    record: TurnRecord
    followed: bool = False

    def follow(self, turn: Turn) -> None:
        self.followed = True
        self.observer.follow(turn, self.span, self.record)


class ServerTelemetry:
    """Tracer, instruments and turn observer of one server process."""

    def __init__(self, settings: TelemetrySettings, model: str) -> None:
        self.settings = settings
        self.tracer, self._flush_traces = open_tracer(settings)
        self.metrics = MetricsExport(settings)
        self._meter = self.metrics.meter("hosting.server")
        self.turns = TurnObserver(self.tracer, TurnMetrics(self._meter, "agent"), model, settings.raw_session_ids)

    def observe_sessions(self, status: Callable[[], dict[str, Any]]) -> None:
        """Gauges read from the session manager's status when metrics are collected."""

        def reader(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda options: [Observation(status()[key])]

        for name, (key, description) in SESSION_GAUGES.items():
            self._meter.create_observable_gauge(name, callbacks=[reader(key)], description=description)
        self._meter.create_observable_counter("agent.store_failures", callbacks=[reader("store_failures")],
                                             description="Session store writes or reads that failed")

    def install(self, app: FastAPI, metrics_tokens: list[str | None]) -> None:
        """``GET /metrics`` for bearers of ``metrics_tokens`` (open if none is set), and request spans."""
        install_telemetry(app, self.settings, self.tracer, self.metrics, metrics_tokens)

    def shutdown(self) -> None:
        self._flush_traces()
        self.metrics.shutdown()
