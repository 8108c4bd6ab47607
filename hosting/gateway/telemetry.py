"""The gateway's telemetry: request spans with their steps, turn metrics by tenant, pool numbers.

The gateway relays a turn's bytes without interpreting them; to count a tenant's turns,
tokens and cost it is told of each relayed event by the relay's own reader of the SSE
lines (:class:`hosting.gateway.event_stream.StreamWatcher`), and changes nothing. Its
steps (auth, route lookup, provisioning or pool claim, relay) are child spans of the
request's, and the relay's span is current when the request to the sandbox is made, so
the sandbox's spans continue the same trace.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, get_args

from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.pool import WarmPool
from hosting.gateway.pool_demand import PoolDemand, TargetCause
from hosting.gateway.provisioning import Provisioner, ProvisioningStore, SharedScope
from hosting.gateway.quotas import Quotas
from hosting.gateway.routing.records import PoolEntry, Route
from hosting.gateway.tenants import Authenticator
from hosting.sandboxes.base import Sandbox, SandboxBackend, SandboxSpec
from hosting.telemetry.http import install_telemetry
from hosting.telemetry.metrics import LATENCY_BUCKETS_SECONDS, MetricsExport
from hosting.telemetry.settings import TelemetrySettings
from hosting.telemetry.tracing import open_tracer, request_context, session_label
from hosting.telemetry.turns import TurnMetrics, TurnRecord, status_error_code
from hosting.wire import WireEvent


@dataclass
class GatewayTurn:
    """One turn through the gateway: its record and the span of its relay."""

    telemetry: GatewayTelemetry
    record: TurnRecord
    relay_span: Span | None = None
    streaming: bool = field(default=False)
    on_result: Callable[[dict[str, Any]], None] | None = None
    """Told of each relayed ``result`` event's data (the tenant's budgets count its spend)."""

    @contextmanager
    def relaying(self) -> Iterator[None]:
        """Make the relay's span current around the request to the sandbox (its
        ``traceparent`` then names it); it ends with the stream (:meth:`watch`)."""
        with self.telemetry.tracer.start_as_current_span("gateway.relay", end_on_exit=False) as span:
            self.relay_span = span
            yield

    def refused_by_sandbox(self, status: int) -> None:
        self.telemetry.refused(self.record, status_error_code(status))

    def answered(self, status: int, content: bytes) -> None:
        """Count a turn answered in one piece (``POST /runtime/advance``): completed on 200;
        failed with the error's code if the turn ran into one; else refused."""
        if status == 200:
            self.record.result = {}
        else:
            try:
                detail = json.loads(content).get("detail")
            except (ValueError, AttributeError):
                detail = None
            if not (isinstance(detail, dict) and isinstance(detail.get("code"), str)):
                self.refused_by_sandbox(status)
                return
            self.record.error_code = detail["code"]
        self.record.record(self.telemetry.turn_metrics, self.relay_span or trace.INVALID_SPAN)

    def lost(self) -> None:
        """The sandbox went away before the turn started."""
        self.record.error_code = ErrorCode.SANDBOX_LOST.value
        self.record.record(self.telemetry.turn_metrics, self.relay_span or trace.INVALID_SPAN)

    def saw(self, kind: str, data: bytes) -> None:
        """One relayed event (see :class:`hosting.gateway.event_stream.StreamWatcher`); only the
        final ones are decoded, the rest are counted."""
        payload = json.loads(data) if kind in ("result", "error") else {}
        self.record.see(WireEvent(kind, payload))
        if kind == "result" and self.on_result is not None:
            self.on_result(payload)

    def finish(self) -> None:
        """The relayed stream ended, however it ended: count the turn and end its span."""
        span = self.relay_span or trace.INVALID_SPAN
        self.record.record(self.telemetry.turn_metrics, span)
        span.end()


class GatewayTelemetry:
    """Tracer, instruments and wrappers of one gateway process."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.tracer, self._flush_traces = open_tracer(settings)
        self.metrics = MetricsExport(settings)
        meter = self.metrics.meter("hosting.gateway")
        self.turn_metrics = TurnMetrics(meter, "agent.gateway")
        self.pool_ready = meter.create_gauge("agent.gateway.warm_pool.ready",
                                             description="Ready sandboxes in the warm pool (all replicas)")
        self.pool_target = meter.create_gauge("agent.gateway.warm_pool.target",
                                              description="Ready sandboxes the warm pool aims for now: one per "
                                                          "recent claim, between its floor and its max")
        self.pool_target_cause = meter.create_gauge("agent.gateway.warm_pool.target_cause",
                                                    description="Why the target is what it is: 1 for the cause "
                                                                "now, 0 for the others (floor, demand, max)")
        self.pool_claims = meter.create_counter("agent.gateway.warm_pool.claims",
                                                description="New sessions by where their sandbox came from "
                                                            "(result: claimed from the pool, or empty: started cold)")
        self.provisioning = meter.create_histogram("agent.gateway.provision.duration", unit="s",
                                                   description="Starting a sandbox until it is ready (kind: session, "
                                                               "shared for a tenant-scope volume's, "
                                                               "or pool for a warm-pool refill)",
                                                   explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_SECONDS)
        self.store_failures = meter.create_counter("agent.gateway.route_store.failures",
                                                   description="Requests that found the routing store unavailable")
        self._meter = meter

    def observe_running(self, running_streams: Callable[[], int]) -> None:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(running_streams())]

        self._meter.create_observable_gauge("agent.gateway.running_turns", callbacks=[observe],
                                            description="Turns in flight through this replica")

    def install(self, app: FastAPI, metrics_tokens: list[str | None], pool: WarmPool) -> None:
        """``GET /metrics`` and request spans; the pool's size and target are read before each scrape."""

        async def refresh() -> None:
            status = await pool.status()
            self.pool_ready.set(status["ready"])
            self.pool_target.set(status["target"])
            for cause in get_args(TargetCause):
                self.pool_target_cause.set(int(cause == status["cause"]), {"cause": cause})

        install_telemetry(app, self.settings, self.tracer, self.metrics, metrics_tokens, before_scrape=refresh,
                          off_without_tokens="metrics are off: set GATEWAY_METRICS_TOKEN (or GATEWAY_ADMIN_TOKEN); "
                                             "they show every tenant's usage")

    @contextmanager
    def turn(self, tenant: str) -> Iterator[GatewayTurn]:
        """Follow a turn request: a refusal (a :class:`HostingError`) is counted under its code;
        a relayed stream (``streaming`` set) by :meth:`GatewayTurn.finish`."""
        observed = GatewayTurn(self, TurnRecord(time.monotonic(), {"tenant": tenant}))
        try:
            yield observed
        except BaseException as exc:
            if isinstance(exc, HostingError):
                self.refused(observed.record, exc.code.value)
            if observed.relay_span is not None:
                observed.relay_span.end()
            raise
        if not observed.streaming and observed.relay_span is not None:
            observed.relay_span.end()

    def refused(self, record: TurnRecord, code: str) -> None:
        self.turn_metrics.turns.add(1, {**record.labels, "outcome": "refused", "error_code": code})
        span = trace.get_current_span()
        span.set_attribute("agent.outcome", "refused")
        span.set_attribute("agent.error_code", code)
        span.set_status(Status(StatusCode.ERROR, code))

    def authenticator(self, inner: Authenticator) -> Authenticator:
        return ObservedAuthenticator(inner, self.tracer)

    def shutdown(self) -> None:
        self._flush_traces()
        self.metrics.shutdown()


class ObservedAuthenticator:
    """An authenticator whose verdict is a span (``gateway.auth``) and, for the logs, the tenant."""

    def __init__(self, inner: Authenticator, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    def authenticate(self, request: Request) -> str | None:
        with self._tracer.start_as_current_span("gateway.auth") as span:
            tenant = self._inner.authenticate(request)
            span.set_attribute("agent.authenticated", tenant is not None)
            if tenant is not None:
                span.set_attribute("agent.tenant", tenant)
                context = request_context.get()
                if context is not None:
                    context.tenant = tenant
            return tenant


class ObservedProvisioner(Provisioner):
    """The provisioner, its steps as spans (route lookup, provisioning, pool claim, sandbox
    start) and its numbers as metrics (claims, provisioning time)."""

    def __init__(self, telemetry: GatewayTelemetry, backend: SandboxBackend, store: ProvisioningStore,
                 sandbox_env: Mapping[str, str], timeout_seconds: float, demand: PoolDemand | None,
                 quotas: Quotas | None, shared: SharedScope | None = None) -> None:
        super().__init__(backend, store, sandbox_env, timeout_seconds, demand, quotas, shared)
        self._telemetry = telemetry
        self._tracer = telemetry.tracer
        self._raw = telemetry.settings.raw_session_ids

    async def route(self, session_id: str, tenant: str) -> Route | None:
        with self._tracer.start_as_current_span("gateway.route_lookup") as span:
            route = await super().route(session_id, tenant)
            span.set_attribute("agent.route_found", route is not None)
            return route

    async def ensure(self, session_id: str, tenant: str, known: Route | None = None) -> Route:
        if known is not None and known.tenant == tenant and known.sandbox_id is not None:
            return known
        with self._tracer.start_as_current_span("gateway.provision") as span:
            span.set_attribute("agent.session", session_label(session_id, self._raw))
            return await super().ensure(session_id, tenant, known)

    async def start(self, spec: SandboxSpec) -> Sandbox:
        kind = "session" if spec.session_id is not None else "shared" if spec.tenant is not None else "pool"
        started = time.monotonic()
        with self._tracer.start_as_current_span("gateway.sandbox_start") as span:
            span.set_attribute("agent.sandbox_kind", kind)
            sandbox = await super().start(spec)
        self._telemetry.provisioning.record(time.monotonic() - started, {"kind": kind})
        return sandbox

    async def claim_from_pool(self, session_id: str, tenant: str) -> PoolEntry | None:
        # The claim is the step the pool exists for: worth a span and a count of its own.
        with self._tracer.start_as_current_span("gateway.pool_claim") as span:
            claimed = await super().claim_from_pool(session_id, tenant)
            result = "claimed" if claimed is not None else "empty"
            span.set_attribute("agent.pool_claim", result)
        self._telemetry.pool_claims.add(1, {"result": result})
        return claimed
