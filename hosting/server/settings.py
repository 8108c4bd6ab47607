"""Every setting of the agent server (and run-once), in one typed place, read once at start-up.

Nothing else in the server reads ``os.environ``: the server, run-once and the
tests build a :class:`Settings` and pass it down, so what a process does is
decided by one object that can be printed, compared and faked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hosting.contract import MAX_BODY_BYTES
from hosting.http_limits import HttpLimits
from hosting.server.box import (
    CLI_BYTES,
    CLI_SHARED_BYTES,
    MAX_PREWARM,
    MAX_WARM_SESSIONS,
    MEMORY_SHARE,
    SERVER_BYTES,
    Box,
    read_box,
    usable_cpus,
)
from hosting.server.loopback import is_loopback
from hosting.settings_env import ConfigError, flag_setting, float_setting, int_setting, optional_setting
from hosting.stores import store_url_setting
from hosting.telemetry.settings import TelemetrySettings, cli_telemetry_env
from research_agent.options import DEFAULT_MODEL


def _max_budget_usd(env: Mapping[str, str]) -> float | None:
    raw = optional_setting(env, "AGENT_MAX_BUDGET_USD")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"AGENT_MAX_BUDGET_USD must be a number of US dollars > 0 (unset: no limit), got {raw!r}")
    return value


CLI_RUNTIME_DEFAULTS: Mapping[str, str] = {"BUN_JSC_useDFGJIT": "0", "BUN_GC_TIMER_DISABLE": "1"}
"""Runtime tuning of the Claude Code CLI (a Bun binary), each overridable by setting
the same variable for the server (measured in bench/README.md):

- ``BUN_JSC_useDFGJIT=0``: the optimizing JIT compiles the same code again in every
  CLI and costs more CPU than it saves over a session's short turns; without it a
  CLI starts on about a quarter less CPU and concurrent turns need about a fifth less.
- ``BUN_GC_TIMER_DISABLE=1``: Bun's periodic collector costs a new CLI about 0.3
  CPU-seconds over its first half minute, idle or not; without it the engine still
  collects as the heap grows (memory stays flat over hundreds of turns)."""


@dataclass(frozen=True)
class Settings:
    """Configuration of one agent server (or one run-once job).

    :meth:`from_env` sizes the CLI pools to ``box``, the limits the process runs
    under; built directly (tests), they are what is passed, or the sizes for a
    box with room to spare.
    """

    host: str = "0.0.0.0"
    port: int = 8000
    data_dir: Path = Path("/data")
    auth_token: str | None = field(default=None, repr=False)
    allow_unauthenticated: bool = False
    """``AGENT_ALLOW_UNAUTHENTICATED=1``: serve without a token on a non-loopback address, on purpose."""
    api_docs: bool = False
    """``AGENT_API_DOCS=1``: serve the interactive API page at ``/docs`` (same-origin assets only)."""
    model: str = DEFAULT_MODEL
    anthropic_base_url: str | None = None
    anthropic_api_key: str | None = field(default=None, repr=False)
    claude_code_oauth_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = MAX_BODY_BYTES
    http: HttpLimits = field(default_factory=HttpLimits)
    """Header deadline and size, keep-alive (``AGENT_HTTP_*``)."""
    heartbeat_seconds: float = 15.0
    warm_sessions: int = MAX_WARM_SESSIONS
    prewarm: int = MAX_PREWARM
    session_capacity: int | None = None
    """``AGENT_SESSION_CAPACITY``: the most sessions this server will hold (a gateway's sandbox
    made for one session: 1); ``None``: no limit. The pre-started pool never holds more CLIs
    than sessions still to come (``prestart.py``)."""
    max_starting_clis: int = field(default_factory=usable_cpus)
    queue_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 30.0
    session_store_url: str | None = field(default=None, repr=False)
    session_ttl_seconds: int | None = 30 * 24 * 3600
    session_sweep_seconds: float = 3600.0
    local_cache_seconds: int | None = 24 * 3600
    disk_budget_bytes: int | None = None
    max_budget_usd: float | None = None
    """Most a turn may spend (``AGENT_MAX_BUDGET_USD``, the SDK's ``max_budget_usd``); ``None``: no limit."""
    cli_runtime: Mapping[str, str] = field(default_factory=lambda: dict(CLI_RUNTIME_DEFAULTS))
    box: Box = field(default_factory=read_box)
    telemetry: TelemetrySettings = field(default_factory=lambda: TelemetrySettings(service_name="agent-server"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, box: Box | None = None) -> Settings:
        """Read the environment and the box (see :meth:`Box.fit` for the sizes it gives).
        Bad values raise :class:`ConfigError` naming the variable."""
        env = os.environ if env is None else env
        box = read_box() if box is None else box
        fit = box.fit()
        prewarm = int_setting(env, "AGENT_PREWARM", fit.prewarm)
        return cls(
            host=env.get("HOST", "").strip() or cls.host,
            port=int_setting(env, "PORT", cls.port, minimum=1),
            data_dir=Path(env.get("AGENT_DATA_DIR", "").strip() or cls.data_dir),
            auth_token=optional_setting(env, "AGENT_AUTH_TOKEN"),
            allow_unauthenticated=flag_setting(env, "AGENT_ALLOW_UNAUTHENTICATED"),
            api_docs=flag_setting(env, "AGENT_API_DOCS"),
            model=env.get("MODEL", "").strip() or DEFAULT_MODEL,
            anthropic_base_url=optional_setting(env, "ANTHROPIC_BASE_URL"),
            anthropic_api_key=optional_setting(env, "ANTHROPIC_API_KEY"),
            claude_code_oauth_token=optional_setting(env, "CLAUDE_CODE_OAUTH_TOKEN"),
            http=HttpLimits.from_env(env, "AGENT_"),
            heartbeat_seconds=float_setting(env, "AGENT_HEARTBEAT_SECONDS", cls.heartbeat_seconds),
            warm_sessions=int_setting(env, "AGENT_WARM_SESSIONS", fit.warm_sessions(prewarm)),
            prewarm=prewarm,
            session_capacity=int_setting(env, "AGENT_SESSION_CAPACITY", 0, minimum=1) or None,
            max_starting_clis=int_setting(env, "AGENT_MAX_STARTING_CLIS", fit.max_starting_clis, minimum=1),
            queue_timeout_seconds=float_setting(env, "AGENT_QUEUE_TIMEOUT_SECONDS", cls.queue_timeout_seconds),
            idle_timeout_seconds=float_setting(env, "AGENT_IDLE_TIMEOUT_SECONDS", cls.idle_timeout_seconds),
            shutdown_grace_seconds=float_setting(env, "AGENT_SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds),
            session_store_url=store_url_setting(env),
            session_ttl_seconds=int_setting(env, "AGENT_SESSION_TTL_SECONDS", cls.session_ttl_seconds or 0) or None,
            session_sweep_seconds=float_setting(env, "AGENT_SESSION_SWEEP_SECONDS", cls.session_sweep_seconds, minimum=0.1),
            local_cache_seconds=int_setting(env, "AGENT_LOCAL_CACHE_SECONDS", cls.local_cache_seconds or 0) or None,
            disk_budget_bytes=int_setting(env, "AGENT_DISK_BUDGET_BYTES", 0) or None,
            max_budget_usd=_max_budget_usd(env),
            cli_runtime={name: env.get(name, value) for name, value in CLI_RUNTIME_DEFAULTS.items()},
            box=box,
            telemetry=TelemetrySettings.from_env(env, default_service="agent-server",
                                                 metrics_token_variable="AGENT_METRICS_TOKEN"),
        )

    @property
    def cli_budget(self) -> int:
        """Most CLIs alive at once (warm, running, pre-started, starting): what fits the box,
        or more if the warm cap and the pool were set higher (they win, with a warning)."""
        return max(self.box.fit().clis, self.warm_sessions + self.prewarm)

    def fit_warning(self) -> str | None:
        """The one warning to log at start-up when the settings or the box leave no headroom."""
        fit = self.box.fit()
        held = self.warm_sessions + self.prewarm
        if held > fit.clis:
            need = SERVER_BYTES + CLI_SHARED_BYTES + held * CLI_BYTES
            return (f"AGENT_WARM_SESSIONS={self.warm_sessions} and AGENT_PREWARM={self.prewarm} may hold {held} CLIs, "
                    f"about {need / 2**20:.0f} MiB with the server, but {self.box.describe()} fits {fit.clis} "
                    f"within {MEMORY_SHARE:.0%} of {self.box.memory / 2**20:.0f} MiB: expect reclaim stalls and "
                    "OOM-killed turns. Unset them to size from the limit.")
        if not fit.enough_for_one:
            wanted = (SERVER_BYTES + CLI_SHARED_BYTES + CLI_BYTES) / MEMORY_SHARE
            return (f"{self.box.describe()}: the server and one CLI want about {wanted / 2**20:.0f} MiB "
                    "with headroom; one CLI runs at a time and turns may stall or be OOM-killed.")
        return None

    def require_credentials(self) -> None:
        """Fail once, at start-up, instead of once per turn."""
        if not (self.anthropic_api_key or self.claude_code_oauth_token):
            raise ConfigError(
                "No model credentials: set ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN "
                "(for the offline local model any non-empty value works, with "
                "ANTHROPIC_BASE_URL pointing at it)."
            )

    @property
    def on_loopback(self) -> bool:
        """Listening on a loopback address: only this machine can connect, so no token is needed,
        and requests must name a loopback host (:mod:`hosting.server.loopback`)."""
        return is_loopback(self.host)

    def require_auth_off_loopback(self) -> None:
        """Never open to a network by accident: off loopback, a token or an explicit opt-out."""
        if not (self.on_loopback or self.auth_token or self.allow_unauthenticated):
            raise ConfigError(
                f"HOST={self.host} is reachable from other machines and AGENT_AUTH_TOKEN is not set: set "
                "AGENT_AUTH_TOKEN to require a bearer token, or AGENT_ALLOW_UNAUTHENTICATED=1 to serve without one "
                "on purpose (or HOST=127.0.0.1)"
            )

    def cli_env(self) -> dict[str, str]:
        """Variables handed to the Claude Code CLI on top of its inherited environment.

        Credentials go through explicitly; the server's own secrets are blanked
        so no tool the model runs can read them back.
        """
        env = {**self.cli_runtime, **cli_telemetry_env(self.telemetry), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "AGENT_AUTH_TOKEN": "", "AGENT_SESSION_STORE": ""}
        for name, value in (
            ("ANTHROPIC_BASE_URL", self.anthropic_base_url),
            ("ANTHROPIC_API_KEY", self.anthropic_api_key),
            ("CLAUDE_CODE_OAUTH_TOKEN", self.claude_code_oauth_token),
        ):
            if value:
                env[name] = value
        return env
