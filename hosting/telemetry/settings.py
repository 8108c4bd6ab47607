"""What telemetry a process does, decided once at start-up from its environment.

The OpenTelemetry SDK reads its own standard ``OTEL_*`` variables (endpoint, headers,
sampler, timeouts, resource attributes); this module only reads enough of them to
decide *whether* to export, so that with none set no exporter, thread or span
processor exists at all. Values the project itself cannot honour (a gRPC protocol, an
exporter other than OTLP) are refused here with :class:`~hosting.settings_env.ConfigError`
rather than failing on the first span.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hosting.settings_env import ConfigError, flag_setting, optional_setting

LogFormat = Literal["text", "json"]

CLI_TELEMETRY_VARIABLE = "CLAUDE_CODE_ENABLE_TELEMETRY"

PASSED_TO_SANDBOXES = ("AGENT_LOG_FORMAT", "AGENT_TELEMETRY_RAW_SESSION_IDS", CLI_TELEMETRY_VARIABLE)
"""Telemetry variables a gateway hands its sandboxes, besides ``OTEL_*`` (see :func:`sandbox_env`)."""


def _exporter(env: Mapping[str, str], signal: str) -> bool:
    """Whether ``signal`` (traces, metrics) goes out over OTLP, per the standard variables."""
    if flag_setting(env, "OTEL_SDK_DISABLED"):
        return False
    name = f"OTEL_{signal.upper()}_EXPORTER"
    chosen = env.get(name, "").strip().lower() or "otlp"
    if chosen == "none":
        return False
    if chosen != "otlp":
        raise ConfigError(f"{name} must be otlp or none, got {chosen!r}")
    for protocol_name in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(protocol_name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ConfigError(f"{protocol_name} must be http/protobuf (the exporter this image ships), got {protocol!r}")
    return bool(optional_setting(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
                or optional_setting(env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))


@dataclass(frozen=True)
class TelemetrySettings:
    """Traces, metrics and logs of one server or gateway process.

    - ``export_traces`` / ``export_metrics``: an OTLP endpoint is configured
      (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the per-signal one) and the signal is not
      turned off (``OTEL_TRACES_EXPORTER=none``, ``OTEL_SDK_DISABLED=true``).
    - ``service_name``: ``OTEL_SERVICE_NAME``, else the process's own default.
    - ``raw_session_ids``: ``AGENT_TELEMETRY_RAW_SESSION_IDS=1`` puts session ids in spans,
      logs and metrics as they are; by default they appear hashed.
    - ``log_format``: ``AGENT_LOG_FORMAT`` (``text``, the default, or ``json``).
    - ``metrics_token``: a bearer token that may read ``GET /metrics`` (besides the
      process's usual credentials), for a scraper that should not hold them.
    - ``cli_telemetry``: ``CLAUDE_CODE_ENABLE_TELEMETRY=1``: the Claude Code CLI exports
      its own telemetry with the ``OTEL_*`` settings it is handed.
    - ``trust_client_trace``: a request's ``traceparent`` and ``baggage`` are adopted. A
      server trusts its caller (its gateway, or the one client of a lone server); the
      gateway's clients are tenants, so it adopts theirs only when told to
      (``GATEWAY_TRUST_CLIENT_TRACE=1``), else starts a trace of its own (see
      :class:`~hosting.telemetry.tracing.RequestSpans`).
    """

    service_name: str
    export_traces: bool = False
    export_metrics: bool = False
    raw_session_ids: bool = False
    log_format: LogFormat = "text"
    metrics_token: str | None = field(default=None, repr=False)
    cli_telemetry: bool = False
    trust_client_trace: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, default_service: str, metrics_token_variable: str,
                 trust_variable: str | None = None) -> TelemetrySettings:
        """``trust_variable``: the flag that lets clients' trace context in (unset: always trusted)."""
        log_format = env.get("AGENT_LOG_FORMAT", "").strip().lower() or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"AGENT_LOG_FORMAT must be text or json, got {log_format!r}")
        return cls(
            service_name=optional_setting(env, "OTEL_SERVICE_NAME") or default_service,
            export_traces=_exporter(env, "traces"),
            export_metrics=_exporter(env, "metrics"),
            raw_session_ids=flag_setting(env, "AGENT_TELEMETRY_RAW_SESSION_IDS"),
            log_format="json" if log_format == "json" else "text",
            metrics_token=optional_setting(env, metrics_token_variable),
            cli_telemetry=flag_setting(env, CLI_TELEMETRY_VARIABLE),
            trust_client_trace=trust_variable is None or flag_setting(env, trust_variable),
        )


def telemetry_sandbox_env(env: Mapping[str, str]) -> dict[str, str]:
    """What a gateway passes on to its sandboxes' servers: the ``OTEL_*`` settings (so
    their spans join the gateway's traces) except the service name (a sandbox names
    itself ``agent-server``), and the telemetry switches of :data:`PASSED_TO_SANDBOXES`."""
    return {name: value for name, value in env.items()
            if value.strip() and ((name.startswith("OTEL_") and name != "OTEL_SERVICE_NAME")
                                  or name in PASSED_TO_SANDBOXES)}


def cli_telemetry_env(settings: TelemetrySettings) -> dict[str, str]:
    """The CLI's telemetry switch. The CLI inherits the server's environment (the SDK
    starts it so), ``OTEL_*`` included; so when the operator turned its telemetry on, it
    exports with those settings under its own service name, and otherwise the switch is
    explicitly off, whatever it would inherit."""
    if not settings.cli_telemetry:
        return {CLI_TELEMETRY_VARIABLE: "0"}
    return {CLI_TELEMETRY_VARIABLE: "1", "OTEL_SERVICE_NAME": "claude-code"}
