"""The agent server's telemetry: its spans, its metrics and what ``GET /metrics`` shows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from opentelemetry.metrics import CallbackOptions, Observation

from hosting.telemetry.http import install_telemetry
from hosting.telemetry.metrics import MetricsExport
from hosting.telemetry.settings import TelemetrySettings
from hosting.telemetry.tracing import open_tracer
from hosting.telemetry.turns import TurnMetrics, TurnObserver

SESSION_GAUGES = {
    "agent.live_sessions": ("live_sessions", "Sessions with a connected CLI (warm or running a turn)"),
    "agent.running_turns": ("running_turns", "Turns running now"),
    "agent.prestarted_clis": ("prewarmed", "Pre-started CLIs waiting for a new session"),
    "agent.queued_turns": ("queued_turns", "Turns waiting for room for their CLI"),
}


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
