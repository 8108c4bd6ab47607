"""What one turn tells the operator: the turn metrics and span attributes, from its wire events.

Shared by the server (:mod:`hosting.server.telemetry`) and the gateway
(:mod:`hosting.gateway.telemetry`). It sees only what the wire format says: counts,
usage, cost, error codes; never text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.trace import Span, Status, StatusCode

from hosting.errors import ErrorCode
from hosting.telemetry.metrics import LATENCY_BUCKETS_SECONDS
from hosting.wire import WireEvent


def status_error_code(status: int) -> str:
    """The error code of a turn refused with only its HTTP status known (a sandbox's answer,
    relayed): the status's general code (:meth:`ErrorCode.for_status`), else ``http_<status>``."""
    code = ErrorCode.for_status(status)
    return code.value if code is not None else f"http_{status}"


USAGE_TOKENS = {"input_tokens": "input", "output_tokens": "output", "cache_read_input_tokens": "cache_read",
                "cache_creation_input_tokens": "cache_creation"}


class TurnMetrics:
    """The turn instruments of one process; ``prefix`` tells the server's from the gateway's."""

    def __init__(self, meter: Meter, prefix: str) -> None:
        self.turns = meter.create_counter(f"{prefix}.turns", description="Turns by outcome (completed, failed, refused) "
                                          "and error code (empty when completed)")
        self.duration = meter.create_histogram(f"{prefix}.turn.duration", unit="s",
                                               description="From the request to the turn's done event",
                                               explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_SECONDS)
        self.first_event = meter.create_histogram(f"{prefix}.turn.first_event", unit="s",
                                                  description="From the request to the first event after session "
                                                              "(the model's first output, or an error)",
                                                  explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_SECONDS)
        self.tokens = meter.create_counter(f"{prefix}.tokens", description="Model tokens of finished turns, by kind "
                                           "(input, output, cache_read, cache_creation)")
        self.cost = meter.create_counter(f"{prefix}.cost_usd", description="Model cost of finished turns, USD")
        self.tool_calls = meter.create_counter(f"{prefix}.tool_calls", description="Tool calls made by turns")


@dataclass
class TurnRecord:
    """What the wire events of one turn added up to."""

    started: float
    labels: dict[str, str] = field(default_factory=dict)
    first_event_at: float | None = None
    tool_calls: int = 0
    error_code: str | None = None
    result: dict[str, Any] | None = None

    def see(self, event: WireEvent) -> None:
        if event.type == "session":
            return
        if self.first_event_at is None:
            self.first_event_at = time.monotonic()
        if event.type == "tool_use":
            self.tool_calls += 1
        elif event.type == "result":
            self.result = event.data
        elif event.type == "error" and self.error_code is None:
            self.error_code = str(event.data.get("code", "unknown"))

    @property
    def outcome(self) -> str:
        return "failed" if self.error_code is not None or self.result is None else "completed"

    def record(self, metrics: TurnMetrics, span: Span) -> None:
        """Count the finished turn and describe it on its span."""
        now = time.monotonic()
        labels = {**self.labels, "outcome": self.outcome, "error_code": self.error_code or ""}
        metrics.turns.add(1, labels)
        metrics.duration.record(now - self.started, {**self.labels, "outcome": self.outcome})
        if self.first_event_at is not None:
            metrics.first_event.record(self.first_event_at - self.started, self.labels)
        if self.tool_calls:
            metrics.tool_calls.add(self.tool_calls, self.labels)
        span.set_attribute("agent.outcome", self.outcome)
        span.set_attribute("agent.tool_calls", self.tool_calls)
        if self.error_code is not None:
            span.set_attribute("agent.error_code", self.error_code)
            span.set_status(Status(StatusCode.ERROR, self.error_code))
        if self.result is None:
            return
        usage = self.result.get("usage") or {}
        for key, kind in USAGE_TOKENS.items():
            count = usage.get(key)
            if isinstance(count, int) and count > 0:
                metrics.tokens.add(count, {**self.labels, "kind": kind})
        span.set_attribute("gen_ai.usage.input_tokens", int(usage.get("input_tokens") or 0))
        span.set_attribute("gen_ai.usage.output_tokens", int(usage.get("output_tokens") or 0))
        cost = self.result.get("total_cost_usd")
        if isinstance(cost, (int, float)) and cost > 0:
            metrics.cost.add(float(cost), self.labels)
            span.set_attribute("agent.cost_usd", float(cost))
        if isinstance(self.result.get("duration_ms"), int):
            span.set_attribute("agent.duration_ms", self.result["duration_ms"])
        if isinstance(self.result.get("num_turns"), int):
            span.set_attribute("agent.model_calls", self.result["num_turns"])
