"""Every setting of the gateway, typed, read once at start-up.

Like :mod:`hosting.server.settings` for the server: nothing else in the gateway reads
``os.environ``. Bad values raise :class:`~hosting.settings_env.ConfigError` naming the
variable, and ``agent-gateway`` turns that into one line and exit status 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from hosting.contract import MAX_BODY_BYTES
from hosting.gateway.budgets import TenantBudget
from hosting.gateway.pool_demand import PoolSizing
from hosting.gateway.quotas import TenantLimits
from hosting.gateway.tenants import (
    TenantBudgetOverrides,
    TenantOverrides,
    TenantTokens,
    load_tenant_budgets,
    load_tenant_overrides,
    load_tenant_tokens,
    usd_amount,
)
from hosting.http_limits import HttpLimits
from hosting.sandboxes.settings import BackendSettings
from hosting.settings_env import ConfigError, choice_setting, float_setting, int_setting, optional_setting
from hosting.stores import store_url_setting
from hosting.telemetry.settings import TelemetrySettings, telemetry_sandbox_env

SANDBOX_ENV_ALLOWLIST = (
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "MODEL",
    "AGENT_SESSION_TTL_SECONDS",
    "AGENT_HEARTBEAT_SECONDS",
    "AGENT_IDLE_TIMEOUT_SECONDS",
    "AGENT_QUEUE_TIMEOUT_SECONDS",
    "AGENT_SESSION_SWEEP_SECONDS",
    "AGENT_LOCAL_CACHE_SECONDS",
    "AGENT_DISK_BUDGET_BYTES",
    "CLAUDE_CODE_MAX_RETRIES",
    "AGENT_MAX_BUDGET_USD",
)
"""What a sandbox's server inherits from the gateway's environment, and nothing
else: the model endpoint and credentials, the model, the session store's settings
(never its URL: each sandbox gets a credential of its own, see
:mod:`hosting.gateway.conversations`), and the
telemetry settings, see :func:`~hosting.telemetry.settings.telemetry_sandbox_env`).
Extra names can be added with ``GATEWAY_SANDBOX_ENV`` (comma-separated)."""


SandboxScope = Literal["session", "tenant"]
SANDBOX_SCOPES: tuple[SandboxScope, ...] = ("session", "tenant")

MiB = 2**20


def shared_sandbox_memory_bytes(sessions: int) -> int:
    """The memory a sandbox of ``sessions`` sessions needs to keep each one's CLI warm beside
    its two pre-started ones, as its server sizes itself (:meth:`hosting.server.box.Box.fit`:
    the server and the CLI executable's cache, 160 MiB per CLI, within 80 % of the limit):
    about 2.3 GiB for 8. The default limit of a tenant-scope sandbox (``docker``, ``modal``)."""
    return math.ceil((64 * MiB + 240 * MiB + (sessions + 2) * 160 * MiB) / 0.8) + MiB  # + rounding room


def _default_data_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME", "").strip() or str(Path(env.get("HOME", ".")) / ".local" / "share")
    return Path(base) / "agent-gateway"


def _sandbox_env(env: Mapping[str, str]) -> dict[str, str]:
    extra = [name.strip() for name in env.get("GATEWAY_SANDBOX_ENV", "").split(",") if name.strip()]
    if "AGENT_SESSION_STORE" in extra:
        raise ConfigError("GATEWAY_SANDBOX_ENV must not name AGENT_SESSION_STORE: the gateway's store credential "
                          "never reaches a sandbox (each gets its own, for its own session)")
    passed = {name: env[name] for name in (*SANDBOX_ENV_ALLOWLIST, *extra) if env.get(name, "").strip()}
    passed.update(telemetry_sandbox_env(env))
    passed["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    return passed


def _redis_url(env: Mapping[str, str]) -> str | None:
    url = optional_setting(env, "GATEWAY_REDIS_URL")
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("GATEWAY_REDIS_URL must start with redis://, rediss:// or unix://")
    return url


def _pool_sizing(env: Mapping[str, str]) -> PoolSizing:
    """The warm pool's bounds. The max defaults to 10, or to the floor if that is larger;
    with a floor of 0 and no max the pool stays off, as ``GATEWAY_WARM_POOL=0`` always meant."""
    floor = int_setting(env, "GATEWAY_WARM_POOL", PoolSizing.floor)
    default_ceiling = max(PoolSizing.ceiling, floor) if floor else 0
    ceiling = int_setting(env, "GATEWAY_WARM_POOL_MAX", default_ceiling)
    if ceiling < floor:
        raise ConfigError(f"GATEWAY_WARM_POOL_MAX ({ceiling}) must be at least GATEWAY_WARM_POOL ({floor}): "
                          "the pool grows from its floor up to its max")
    start_concurrency = int_setting(env, "GATEWAY_POOL_START_CONCURRENCY", PoolSizing.start_concurrency, minimum=1)
    return PoolSizing(floor, ceiling, start_concurrency)


@dataclass(frozen=True)
class GatewaySettings:
    """Configuration of one gateway replica."""

    tenants: TenantTokens = field(repr=False)
    host: str = "0.0.0.0"
    port: int = 8080
    sandboxes: BackendSettings = field(default_factory=BackendSettings)
    """The sandbox backend (``GATEWAY_BACKEND``, ``GATEWAY_DATA_DIR``, ``GATEWAY_DOCKER_*``, ...)."""
    redis_url: str | None = field(default=None, repr=False)
    session_store_url: str | None = field(default=None, repr=False)
    """Where conversations outlive their sandboxes (``AGENT_SESSION_STORE``): the gateway's
    own credential; each sandbox gets one of its own for its session only."""
    session_ttl_seconds: float = 30 * 24 * 3600.0
    """A session unused this long is deleted whole (``GATEWAY_SESSION_TTL_SECONDS``; 0 keeps it)."""
    warm_pool: PoolSizing = field(default_factory=PoolSizing)
    """The warm pool's floor, max and start concurrency (``GATEWAY_WARM_POOL``,
    ``GATEWAY_WARM_POOL_MAX``, ``GATEWAY_POOL_START_CONCURRENCY``)."""
    idle_timeout_seconds: float = 900.0
    provision_timeout_seconds: float = 120.0
    shutdown_grace_seconds: float = 30.0
    admin_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = MAX_BODY_BYTES
    http: HttpLimits = field(default_factory=HttpLimits)
    """Header deadline and size, keep-alive (``GATEWAY_HTTP_*``)."""
    sandbox_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    sandbox_scope: SandboxScope = "session"
    """``GATEWAY_SANDBOX_SCOPE``: ``session``, a sandbox per session; ``tenant``, a sandbox
    serves up to :attr:`sessions_per_sandbox` sessions of one tenant (:mod:`hosting.gateway.tenant_scope`)."""
    sessions_per_sandbox: int = 8
    """``GATEWAY_SESSIONS_PER_SANDBOX``: the sessions a tenant-scope sandbox holds at most."""
    tenant_max_sandboxes: int = TenantLimits.max_sandboxes
    """Live sandboxes per tenant (``GATEWAY_TENANT_MAX_SANDBOXES``; 0 = unlimited)."""
    tenant_max_turns: int = TenantLimits.max_turns
    """Turns running at once per tenant (``GATEWAY_TENANT_MAX_TURNS``; 0 = unlimited)."""
    tenant_turns_per_minute: int = TenantLimits.turns_per_minute
    """Turns started per tenant in any 60 s (``GATEWAY_TENANT_TURNS_PER_MINUTE``; 0 = unlimited)."""
    tenant_overrides: TenantOverrides = field(default_factory=dict)
    """Per-tenant limits from ``GATEWAY_TENANTS_FILE`` (``max_sandboxes=N`` ... after a digest)."""
    tenant_tokens_per_day: int = TenantBudget.tokens_per_day
    """Model tokens per tenant per UTC day (``GATEWAY_TENANT_TOKENS_PER_DAY``; 0 = unlimited)."""
    tenant_usd_per_month: float = TenantBudget.usd_per_month
    """US dollars per tenant per UTC calendar month (``GATEWAY_TENANT_USD_PER_MONTH``; 0 = unlimited)."""
    tenant_budget_overrides: TenantBudgetOverrides = field(default_factory=dict)
    """Per-tenant budgets from ``GATEWAY_TENANTS_FILE`` (``tokens_per_day=N usd_per_month=X`` after a digest)."""
    telemetry: TelemetrySettings = field(
        default_factory=lambda: TelemetrySettings(service_name="agent-gateway", trust_client_trace=False))
    """Traces, metrics and logs (``OTEL_*``, ``AGENT_LOG_FORMAT``, ``GATEWAY_METRICS_TOKEN``); clients' trace
    context only with ``GATEWAY_TRUST_CLIENT_TRACE=1`` (tenants must not join or pollute each other's traces)."""

    @property
    def tenant_limits(self) -> TenantLimits:
        """The limits of every tenant the tenants file does not override."""
        return TenantLimits(self.tenant_max_sandboxes, self.tenant_max_turns, self.tenant_turns_per_minute)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.with_overrides(self.tenant_overrides.get(tenant, {}))

    @property
    def tenant_budget(self) -> TenantBudget:
        """The budgets of every tenant the tenants file does not set."""
        return TenantBudget(self.tenant_tokens_per_day, self.tenant_usd_per_month)

    def budget_for(self, tenant: str) -> TenantBudget:
        return self.tenant_budget.with_overrides(self.tenant_budget_overrides.get(tenant, {}))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read the environment; fail closed when no tenant is configured."""
        env = os.environ if env is None else env
        tenants_file = optional_setting(env, "GATEWAY_TENANTS_FILE")
        provision_timeout_seconds = float_setting(env, "GATEWAY_PROVISION_TIMEOUT_SECONDS", cls.provision_timeout_seconds)
        scope = choice_setting(env, "GATEWAY_SANDBOX_SCOPE", SANDBOX_SCOPES)
        sessions_per_sandbox = int_setting(env, "GATEWAY_SESSIONS_PER_SANDBOX", cls.sessions_per_sandbox, minimum=1)
        sandboxes = BackendSettings.from_env(env, "GATEWAY_", data_dir=_default_data_dir(env), installation="default",
                                             modal_app="research-agent-gateway",
                                             start_timeout_seconds=provision_timeout_seconds)
        if scope == "tenant" and not env.get("GATEWAY_SANDBOX_MEMORY_BYTES", "").strip():
            sandboxes = replace(sandboxes, sandbox_memory_bytes=shared_sandbox_memory_bytes(sessions_per_sandbox))
        settings = cls(
            tenants=load_tenant_tokens(env.get("GATEWAY_TENANTS", ""), tenants_file),
            tenant_overrides=load_tenant_overrides(tenants_file),
            tenant_max_sandboxes=int_setting(env, "GATEWAY_TENANT_MAX_SANDBOXES", cls.tenant_max_sandboxes),
            tenant_max_turns=int_setting(env, "GATEWAY_TENANT_MAX_TURNS", cls.tenant_max_turns),
            tenant_turns_per_minute=int_setting(env, "GATEWAY_TENANT_TURNS_PER_MINUTE", cls.tenant_turns_per_minute),
            tenant_budget_overrides=load_tenant_budgets(tenants_file),
            tenant_tokens_per_day=int_setting(env, "GATEWAY_TENANT_TOKENS_PER_DAY", cls.tenant_tokens_per_day),
            tenant_usd_per_month=usd_amount(env.get("GATEWAY_TENANT_USD_PER_MONTH", "").strip() or "0",
                                            "GATEWAY_TENANT_USD_PER_MONTH"),
            host=env.get("HOST", "").strip() or cls.host,
            port=int_setting(env, "PORT", cls.port, minimum=1),
            sandboxes=sandboxes,
            sandbox_scope=scope,
            sessions_per_sandbox=sessions_per_sandbox,
            redis_url=_redis_url(env),
            session_store_url=store_url_setting(env),
            session_ttl_seconds=float_setting(env, "GATEWAY_SESSION_TTL_SECONDS", cls.session_ttl_seconds),
            warm_pool=_pool_sizing(env),
            idle_timeout_seconds=float_setting(env, "GATEWAY_IDLE_TIMEOUT_SECONDS", cls.idle_timeout_seconds),
            provision_timeout_seconds=provision_timeout_seconds,
            shutdown_grace_seconds=float_setting(env, "GATEWAY_SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds),
            admin_token=optional_setting(env, "GATEWAY_ADMIN_TOKEN"),
            http=HttpLimits.from_env(env, "GATEWAY_"),
            sandbox_env=_sandbox_env(env),
            telemetry=TelemetrySettings.from_env(env, default_service="agent-gateway",
                                                 metrics_token_variable="GATEWAY_METRICS_TOKEN",
                                                 trust_variable="GATEWAY_TRUST_CLIENT_TRACE"),
        )
        if not settings.tenants:
            raise ConfigError(
                "no tenant configured: set GATEWAY_TENANTS=token:tenant[,token:tenant...] or "
                "GATEWAY_TENANTS_FILE (lines of 'tenant sha256:<hex of token>'); the gateway never runs open"
            )
        if not (settings.sandbox_env.get("ANTHROPIC_API_KEY") or settings.sandbox_env.get("CLAUDE_CODE_OAUTH_TOKEN")
                # on Modal, the key may be in a Modal secret
                or (settings.sandboxes.backend == "modal" and settings.sandboxes.modal_secrets)):
            raise ConfigError(
                "No model credentials for the sandboxes: set ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN "
                "(for the offline local model any non-empty value works, with ANTHROPIC_BASE_URL pointing at it)."
            )
        return settings
