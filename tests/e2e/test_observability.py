"""Traces, metrics and logs of real server and gateway processes, read the way an operator would.

Spans arrive at a real OTLP/HTTP receiver (:mod:`tests.standins.otlp_receiver`, protobuf decoded with
``opentelemetry-proto``); ``/metrics`` is parsed with ``prometheus_client``'s own text
parser; log lines are parsed as JSON. Turns go through the real SDK and CLI to the
local model, which scripts the tool calls and the API errors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hosting.gateway.settings import GatewaySettings
from hosting.server.box import Box
from hosting.server.settings import Settings
from hosting.settings_env import ConfigError
from hosting.telemetry.settings import TelemetrySettings, telemetry_sandbox_env
from hosting.telemetry.tracing import RequestSpans, inject_trace_context, open_tracer, session_label
from tests.standins.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.gateways import ADMIN, ALICE, BOB, GatewayProcess, Gateways, auth
from tests.support.polling import wait_for
from tests.support.servers import API_KEY, LocalModel
from tests.support.turns import post_turn

pytestmark = pytest.mark.e2e

SECRET_PROMPT = "zebra-marker-7731"
"""A word only the prompt carries: it must appear in no span attribute and no metric."""

METRICS_TOKEN = "metrics-token-0c4e"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver().start()
    yield started
    started.stop()


@dataclass
class ObservedGateway:
    """One gateway for the gateway tests (starting one is the slow part): spans and metrics
    to its receiver, JSON logs, a metrics token."""

    gateway: GatewayProcess
    receiver: OtlpReceiver
    gateways: Gateways


@pytest.fixture(scope="module")
def observed(local_model: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObservedGateway]:
    receiver = OtlpReceiver().start()
    gateways = Gateways(local_model, tmp_path_factory.mktemp("observed"), "local", None)
    try:
        gateway = gateways.start(**otlp_env(receiver), AGENT_LOG_FORMAT="json", GATEWAY_METRICS_TOKEN=METRICS_TOKEN)
        yield ObservedGateway(gateway, receiver, gateways)
    finally:
        gateways.cleanup()
        receiver.stop()


def otlp_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """Export to ``receiver`` quickly: spans every 100 ms, metrics every 500 ms."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500", **extra}


def scrape(base_url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels without otel_scope_*): value}."""
    response = httpx.get(f"{base_url}/metrics", headers=auth(token) if token else {}, timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope")))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (sample, have), v in samples.items() if sample == name and wanted <= set(have))


def all_attribute_values(spans: list[ReceivedSpan]) -> str:
    return json.dumps([[s.name, s.attributes] for s in spans])


def test_one_turn_through_the_gateway_is_one_trace_across_both_processes(observed: ObservedGateway) -> None:
    gateway, receiver = observed.gateway, observed.receiver
    gateway.wait_pool_full()
    session_id = "obs-trace-1"
    turn = post_turn(gateway.base_url, session_id,
                     f'{SECRET_PROMPT} [[tool:WebSearch {{"query": "otters"}}]]', headers=auth(ALICE))
    assert turn.types[-2:] == ["result", "done"]

    label = session_label(session_id)

    def complete(spans: list[ReceivedSpan]) -> bool:
        ours = {(s.service, s.name) for s in spans if s.attributes.get("agent.session") == label}
        return {("agent-server", "agent.turn"), ("agent-server", "POST /sessions/{session_id}/messages"),
                ("agent-gateway", "POST /sessions/{session_id}/messages")} <= ours

    spans = receiver.wait_for_spans(complete)
    root = next(s for s in spans if s.service == "agent-gateway" and s.name == "POST /sessions/{session_id}/messages"
                and s.attributes.get("agent.session") == label)
    trace = [s for s in spans if s.trace_id == root.trace_id]
    by_id = {s.span_id: s for s in trace}
    names = {(s.service, s.name) for s in trace}
    assert {("agent-gateway", name) for name in ("gateway.auth", "gateway.route_lookup", "gateway.provision",
                                                  "gateway.pool_claim", "gateway.relay")} <= names
    assert ("agent-server", "POST /sessions/{session_id}/messages") in names

    # The server's request span is the child of the gateway's relay span: traceparent carried it.
    served = next(s for s in trace if s.service == "agent-server" and s.name.startswith("POST"))
    assert by_id[served.parent_span_id].name == "gateway.relay"
    turn_span = next(s for s in trace if s.name == "agent.turn")
    assert turn_span.parent_span_id == served.span_id
    attributes = turn_span.attributes
    assert attributes["agent.session"] == session_label(session_id)
    assert attributes["agent.outcome"] == "completed" and attributes["agent.tool_calls"] == 1
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.request.model"] and attributes["agent.model_calls"] == 2
    assert "agent.error_code" not in attributes
    assert by_id[root.span_id].attributes["agent.tenant"] == "alice"
    assert next(s for s in trace if s.name == "gateway.pool_claim").attributes["agent.pool_claim"] == "claimed"

    # Nothing the user said or any secret, and the session id only hashed.
    everything = all_attribute_values(spans)
    for leaked in (SECRET_PROMPT, "otters", session_id, API_KEY, ALICE, BOB, ADMIN, METRICS_TOKEN):
        assert leaked not in everything
    assert receiver.unexpected == []

    # The same instruments reach OTLP and /metrics.
    wait_for(lambda: any(m.service == "agent-gateway" and m.name == "agent.gateway.turns" for m in receiver.metrics))
    wait_for(lambda: any(m.service == "agent-server" and m.name == "agent.turns" for m in receiver.metrics))


CLIENT_TRACE_ID, CLIENT_SPAN_ID = "5eed" * 8, "c1ea" * 4
CLIENT_TRACE = {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01", "baggage": "tenant=forged,plan=free"}
"""What a client of the gateway may send: a trace to join and baggage to pass on."""


@pytest.fixture(scope="module")
def trusting(observed: ObservedGateway, local_model: LocalModel,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway told to trust its clients' trace context, exporting to the same receiver."""
    gateways = Gateways(local_model, tmp_path_factory.mktemp("trusting"), "local", None)
    try:
        # No warm pool: its one turn starts its one sandbox, and nothing refills behind it.
        yield gateways.start(wait_pool=False, **otlp_env(observed.receiver), GATEWAY_TRUST_CLIENT_TRACE="1",
                             GATEWAY_WARM_POOL="0")
    finally:
        gateways.cleanup()


def traced_turn(gateway: GatewayProcess, receiver: OtlpReceiver, session_id: str) -> tuple[ReceivedSpan, ReceivedSpan]:
    """A turn sent with :data:`CLIENT_TRACE`: the gateway's request span and the sandbox's."""
    post_turn(gateway.base_url, session_id, "Hello", headers={**auth(ALICE), **CLIENT_TRACE})
    label = session_label(session_id)

    def request_span(spans: list[ReceivedSpan], service: str) -> ReceivedSpan | None:
        return next((s for s in spans if s.service == service and s.name == "POST /sessions/{session_id}/messages"
                     and s.attributes.get("agent.session") == label), None)

    spans = receiver.wait_for_spans(lambda spans: all(request_span(spans, name) for name in ("agent-gateway",
                                                                                             "agent-server")))
    gateway_span, sandbox_span = (request_span(spans, name) for name in ("agent-gateway", "agent-server"))
    assert gateway_span is not None and sandbox_span is not None
    return gateway_span, sandbox_span


def test_by_default_the_gateway_starts_its_own_trace_and_links_the_clients(observed: ObservedGateway) -> None:
    gateway_span, sandbox_span = traced_turn(observed.gateway, observed.receiver, "obs-untrusted")
    assert gateway_span.trace_id != CLIENT_TRACE_ID and gateway_span.parent_span_id == ""
    assert gateway_span.links == ((CLIENT_TRACE_ID, CLIENT_SPAN_ID),)
    assert sandbox_span.trace_id == gateway_span.trace_id  # the sandbox joins the gateway's trace
    assert not [s for s in observed.receiver.spans if s.trace_id == CLIENT_TRACE_ID]


def test_with_trust_the_sandboxes_spans_join_the_clients_trace(observed: ObservedGateway,
                                                               trusting: GatewayProcess) -> None:
    gateway_span, sandbox_span = traced_turn(trusting, observed.receiver, "obs-trusted")
    assert (gateway_span.trace_id, gateway_span.parent_span_id) == (CLIENT_TRACE_ID, CLIENT_SPAN_ID)
    assert gateway_span.links == ()
    assert sandbox_span.trace_id == CLIENT_TRACE_ID


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
async def test_client_baggage_reaches_a_sandbox_only_from_a_trusted_client(trusted: bool) -> None:
    """What the gateway's relay sends a sandbox (:func:`inject_trace_context`, in the request's
    span as :class:`RequestSpans` starts it) carries the client's baggage only when trusted."""

    async def to_the_sandbox(request: Request) -> JSONResponse:
        headers: dict[str, str] = {}
        inject_trace_context(headers)
        return JSONResponse(headers)

    app = RequestSpans(Starlette(routes=[Route("/sessions/s1/messages", to_the_sandbox, methods=["POST"])]),
                       TracerProvider().get_tracer("test"), raw_session_ids=False, trust_caller=trusted)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
        sent = (await client.post("/sessions/s1/messages", headers=CLIENT_TRACE)).json()
    assert (sent["traceparent"].split("-")[1] == CLIENT_TRACE_ID) is trusted
    assert sent.get("baggage") == (CLIENT_TRACE["baggage"] if trusted else None)


def test_the_gateway_trusts_client_traces_only_when_told() -> None:
    env = {"GATEWAY_TENANTS": "t:alice", "ANTHROPIC_API_KEY": "x"}
    assert not GatewaySettings.from_env(env).telemetry.trust_client_trace
    assert not GatewaySettings(tenants={}).telemetry.trust_client_trace
    assert GatewaySettings.from_env({**env, "GATEWAY_TRUST_CLIENT_TRACE": "1"}).telemetry.trust_client_trace
    server = Settings.from_env({}, box=Box(machine_memory=2**30, cpus=1))
    assert server.telemetry.trust_client_trace  # a server trusts its caller: its gateway
    with pytest.raises(ConfigError, match="GATEWAY_TRUST_CLIENT_TRACE must be 1 or 0"):
        GatewaySettings.from_env({**env, "GATEWAY_TRUST_CLIENT_TRACE": "maybe"})


def test_gateway_metrics_count_turns_tokens_and_claims_by_tenant(observed: ObservedGateway) -> None:
    gateway = observed.gateway
    assert httpx.get(f"{gateway.base_url}/metrics", headers=auth(ALICE)).status_code == 401
    assert httpx.get(f"{gateway.base_url}/metrics").status_code == 401
    gateway.wait_pool_full()
    before = scrape(gateway.base_url, METRICS_TOKEN)
    assert value(before, "agent_gateway_warm_pool_ready") == value(before, "agent_gateway_warm_pool_target") == 1
    # One cause at a time, the one /admin/pool gives (earlier tests of the module may have claimed).
    causes = {cause: value(before, "agent_gateway_warm_pool_target_cause", cause=cause)
              for cause in ("floor", "demand", "max")}
    assert sum(causes.values()) == 1 and causes[gateway.pool()["cause"]] == 1, causes

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    first = post_turn(gateway.base_url, "obs-gw-1", "Hello", headers=auth(ALICE))
    post_turn(gateway.base_url, "obs-gw-1", "Again", headers=auth(ALICE))
    failed = post_turn(gateway.base_url, "obs-gw-2", "Fail [[error:500]]", headers=auth(BOB))
    assert failed.of("error")[0]["code"] == "model_unavailable"

    after = scrape(gateway.base_url, ADMIN)
    assert moved("agent_gateway_turns_total", tenant="alice", outcome="completed") == 2
    assert moved("agent_gateway_turns_total", tenant="alice") == 2
    assert moved("agent_gateway_turns_total", tenant="bob", outcome="failed", error_code="model_unavailable") == 1
    assert moved("agent_gateway_turn_duration_seconds_count", tenant="alice") == 2
    assert moved("agent_gateway_turn_first_event_seconds_count", tenant="alice") == 2
    input_tokens = first.result["usage"]["input_tokens"]
    assert moved("agent_gateway_tokens_total", tenant="alice", kind="input") >= 2 * input_tokens > 0
    assert value(after, "agent_gateway_tokens_total", tenant="bob") == 0
    # Two new sessions: each claimed the pooled sandbox (the pool refills between them) or started cold.
    assert moved("agent_gateway_warm_pool_claims_total") == 2
    assert moved("agent_gateway_warm_pool_claims_total", result="claimed") >= 1
    # For the second session, the pool's refill or a cold start.
    assert moved("agent_gateway_provision_duration_seconds_count") >= 1
    assert value(after, "agent_gateway_running_turns") == 0
    assert "prompt" not in json.dumps(list(after)) and "Hello" not in json.dumps(list(after))


def test_server_metrics_move_by_exactly_what_happened(start_server) -> None:
    server = start_server(AGENT_AUTH_TOKEN="server-token-91", AGENT_METRICS_TOKEN=METRICS_TOKEN,
                          AGENT_PREWARM="2")  # the pre-started CLIs' gauge, below
    assert httpx.get(f"{server.base_url}/metrics").status_code == 401
    assert httpx.get(f"{server.base_url}/metrics", headers=auth("wrong")).status_code == 401
    before = scrape(server.base_url, "server-token-91")
    assert value(before, "agent_turns_total") == 0
    token = auth("server-token-91")

    post_turn(server.base_url, "obs-m-1", 'Search [[tool:WebSearch {"query": "otters"}]]', headers=token)
    post_turn(server.base_url, "obs-m-1", "Thanks", headers=token)
    failed = post_turn(server.base_url, "obs-m-2", "Fail [[error:500]]", headers=token)
    assert failed.of("error")[0]["code"] == "model_unavailable"

    # A 409: a second turn on a session whose turn is still running.
    slow: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: slow.update(turn=post_turn(server.base_url, "obs-m-3",
                                                                        "Wait [[delay:3]]", headers=token)))
    thread.start()
    wait_for(lambda: httpx.get(f"{server.base_url}/ready", headers=token).json()["running_turns"] == 1)
    busy = httpx.post(f"{server.base_url}/sessions/obs-m-3/messages", json={"prompt": "me too"}, headers=token)
    assert busy.status_code == 409
    assert value(scrape(server.base_url, METRICS_TOKEN), "agent_running_turns") == 1
    thread.join(60)
    assert slow["turn"].types[-1] == "done"

    after = scrape(server.base_url, METRICS_TOKEN)
    assert value(after, "agent_turns_total", outcome="completed", error_code="") == 3
    assert value(after, "agent_turns_total", outcome="failed", error_code="model_unavailable") == 1
    assert value(after, "agent_turns_total", outcome="refused", error_code="session_busy") == 1
    assert value(after, "agent_turns_total") == 5
    assert value(after, "agent_turn_duration_seconds_count") == 4
    assert value(after, "agent_turn_duration_seconds_count", outcome="failed") == 1
    # The delayed turn waited 3 s for the model: it is counted above the 2.5 s bucket.
    assert value(after, "agent_turn_duration_seconds_bucket", le="+Inf") - value(after, "agent_turn_duration_seconds_bucket",
                                                                                  le="2.5") >= 1
    assert value(after, "agent_turn_duration_seconds_sum") >= 3
    assert value(after, "agent_turn_first_event_seconds_count") == 4
    assert value(after, "agent_tool_calls_total") == 1
    assert value(after, "agent_tokens_total", kind="input") > 0 and value(after, "agent_tokens_total", kind="output") > 0
    assert value(after, "agent_running_turns") == 0
    assert value(after, "agent_live_sessions") >= 2
    assert value(after, "agent_store_failures_total") == 0
    # The pool refills with spare CPU only: compare with what the server itself reports.
    wait_for(lambda: value(scrape(server.base_url, METRICS_TOKEN), "agent_prestarted_clis")
             == httpx.get(f"{server.base_url}/ready", headers=token).json()["prewarmed"])


def test_no_exporter_configured_sends_nothing(start_server, receiver: OtlpReceiver) -> None:
    # The endpoint is known but both signals are off: nothing may arrive.
    server = start_server(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_TRACES_EXPORTER="none",
                          OTEL_METRICS_EXPORTER="none", OTEL_BSP_SCHEDULE_DELAY="100", OTEL_METRIC_EXPORT_INTERVAL="200")
    post_turn(server.base_url, "obs-off-1", "Hello")
    time.sleep(1.5)
    assert receiver.spans == [] and receiver.metrics == [] and receiver.unexpected == []
    assert value(scrape(server.base_url), "agent_turns_total", outcome="completed") == 1


def test_without_otel_settings_the_tracer_is_the_no_op_one() -> None:
    settings = TelemetrySettings.from_env({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"},
                                          default_service="agent-server", metrics_token_variable="AGENT_METRICS_TOKEN")
    assert not settings.export_traces and not settings.export_metrics
    tracer, flush = open_tracer(settings)
    with tracer.start_as_current_span("x") as span:
        assert not span.is_recording() and not span.get_span_context().is_valid
        headers: dict[str, str] = {}
        inject_trace_context(headers)
        assert headers == {}
    caller = trace.NonRecordingSpan(trace.SpanContext(0x1234, 0x5678, is_remote=True,
                                                      trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
    with trace.use_span(caller), tracer.start_as_current_span("y") as span:  # a caller's trace carries on
        assert span.get_span_context().trace_id == 0x1234
        inject_trace_context(headers)
        assert headers["traceparent"].startswith(f"00-{0x1234:032x}-")
    flush()


def test_json_logs_parse_and_carry_the_turn_trace(observed: ObservedGateway) -> None:
    gateway, receiver = observed.gateway, observed.receiver
    gateway.wait_pool_full()
    session_id = "obs-log-1"
    label = session_label(session_id)
    post_turn(gateway.base_url, session_id, "Hello", headers=auth(ALICE))

    def turn_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        return next((s for s in spans if s.name == "agent.turn" and s.attributes["agent.session"] == label), None)

    trace_id = turn_span(receiver.wait_for_spans(turn_span)).trace_id  # type: ignore[union-attr]

    gateway_lines = [json.loads(line) for line in gateway.log().splitlines() if line.strip()]
    sandbox_log = next(observed.gateways.root.glob(f"gateway-data/**/*{gateway.route(session_id)['sandbox_id']}*.log"))
    sandbox_lines = [json.loads(line) for line in sandbox_log.read_text().splitlines() if line.strip()]
    for line in gateway_lines + sandbox_lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    claimed = [line for line in gateway_lines if "claimed pooled sandbox" in line["message"]
               and line.get("trace_id") == trace_id]
    assert len(claimed) == 1, gateway_lines[-20:]
    assert claimed[0]["tenant"] == "alice"
    assert claimed[0]["session"] == label and len(claimed[0]["span_id"]) == 16
    served = [line for line in sandbox_lines if line.get("trace_id") == trace_id]
    assert served and all(line["session"] == label for line in served)
    for lines in (gateway_lines, sandbox_lines):  # one access line per process, after the turn, id hashed
        access = [line for line in lines if line["logger"] == "hosting.access" and line.get("trace_id") == trace_id]
        assert len(access) == 1, lines[-20:]
        assert f'"POST /sessions/{label}/messages HTTP/1.1" 200 ' in access[0]["message"]
        assert session_id not in access[0]["message"] and access[0]["message"].endswith(" ms")
        assert not [line for line in lines if line["logger"] == "uvicorn.access"]


def test_telemetry_settings_refuse_what_cannot_be_honoured() -> None:
    def read(**env: str) -> TelemetrySettings:
        return TelemetrySettings.from_env(env, default_service="agent-server", metrics_token_variable="AGENT_METRICS_TOKEN")

    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert read(**endpoint).export_traces and read(**endpoint).export_metrics
    assert read(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:4318/v1/traces").export_traces
    assert not read(**endpoint, OTEL_SDK_DISABLED="true").export_traces
    assert read(**endpoint, OTEL_SERVICE_NAME="svc").service_name == "svc"
    for bad, named in ((dict(OTEL_TRACES_EXPORTER="zipkin"), "OTEL_TRACES_EXPORTER"),
                       (dict(OTEL_EXPORTER_OTLP_PROTOCOL="grpc"), "OTEL_EXPORTER_OTLP_PROTOCOL"),
                       (dict(AGENT_LOG_FORMAT="xml"), "AGENT_LOG_FORMAT"),
                       (dict(AGENT_TELEMETRY_RAW_SESSION_IDS="maybe"), "AGENT_TELEMETRY_RAW_SESSION_IDS")):
        with pytest.raises(ConfigError, match=named):
            read(**endpoint, **bad)
    assert read(AGENT_TELEMETRY_RAW_SESSION_IDS="1").raw_session_ids
    assert session_label("abc", raw=True) == "abc" and session_label("abc").startswith("sha256:")


def test_the_cli_and_the_sandboxes_get_the_telemetry_settings() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SERVICE_NAME": "agent-gateway",
           "AGENT_LOG_FORMAT": "json", "CLAUDE_CODE_ENABLE_TELEMETRY": "1", "GATEWAY_ADMIN_TOKEN": "secret"}
    assert telemetry_sandbox_env(env) == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                                          "AGENT_LOG_FORMAT": "json", "CLAUDE_CODE_ENABLE_TELEMETRY": "1"}
    on = Settings.from_env({**env, "ANTHROPIC_API_KEY": "k"}, box=Box(machine_memory=8 * 2**30, cpus=2))
    assert on.cli_env()["CLAUDE_CODE_ENABLE_TELEMETRY"] == "1" and on.cli_env()["OTEL_SERVICE_NAME"] == "claude-code"
    off = Settings.from_env({"ANTHROPIC_API_KEY": "k"}, box=Box(machine_memory=8 * 2**30, cpus=2))
    assert off.cli_env()["CLAUDE_CODE_ENABLE_TELEMETRY"] == "0" and "OTEL_SERVICE_NAME" not in off.cli_env()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cli_exports_its_own_telemetry_only_when_the_operator_turns_it_on(start_server, receiver: OtlpReceiver,
                                                                             enabled: bool) -> None:
    cli = {"CLAUDE_CODE_ENABLE_TELEMETRY": "1"} if enabled else {}
    server = start_server(**otlp_env(receiver), OTEL_METRICS_EXPORTER="otlp", OTEL_TRACES_EXPORTER="none",
                          OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", AGENT_PREWARM="0", **cli)
    post_turn(server.base_url, f"obs-cli-{enabled}", "Hello")
    wait_for(lambda: any(m.service == "agent-server" and m.name == "agent.turns" for m in receiver.metrics))
    if enabled:
        wait_for(lambda: any(m.service == "claude-code" and m.name == "claude_code.token.usage" for m in receiver.metrics))
    else:
        time.sleep(2)  # several of the CLI's export intervals
        assert not any(m.service == "claude-code" for m in receiver.metrics)
    assert receiver.unexpected == []
