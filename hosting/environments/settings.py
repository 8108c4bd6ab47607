"""Every setting of the orchestrator, typed, read once at start-up.

Like :mod:`hosting.gateway.settings`: nothing else in the orchestrator reads
``os.environ``. Bad values raise :class:`~hosting.settings_env.ConfigError` naming the
variable; ``agent-environment-orchestrator`` prints it and exits with status 2.

The environment key is the orchestrator's standing credential: it polls, acks and
stops work with it, and it never leaves this process (a sandbox gets the work
item's own secret). Give it as ``ANTHROPIC_ENVIRONMENT_KEY_FILE`` (a mounted secret)
or ``ANTHROPIC_ENVIRONMENT_KEY``, not both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hosting.environments.sandboxes import runner_pod_template_error
from hosting.http_limits import HttpLimits
from hosting.sandboxes.settings import BackendSettings
from hosting.settings_env import ConfigError, choice_setting, float_setting, int_setting, optional_setting

Mode = Literal["poll", "webhook"]
MODES: tuple[Mode, ...] = ("poll", "webhook")

MAX_BLOCK_MS = 999
"""The API holds an empty poll open for at most this long (``block_ms`` is 1-999)."""


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """``name`` or the contents of the file named by ``name_FILE``; never both."""
    value = optional_setting(env, name)
    path = optional_setting(env, f"{name}_FILE")
    if value and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{name}_FILE: {path} is empty")
    return value


def _url(env: Mapping[str, str], name: str) -> str | None:
    url = optional_setting(env, name)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must start with http:// or https://")
    return url.rstrip("/") if url else None


@dataclass(frozen=True)
class EnvironmentSettings:
    """Configuration of one orchestrator process."""

    environment_id: str
    environment_key: str = field(repr=False)
    api_base_url: str | None = None
    """Where the Claude API is (``ANTHROPIC_BASE_URL``); ``None``: the SDK's default."""
    sandbox_api_base_url: str | None = None
    """The API as a sandbox reaches it (``ENVIRONMENT_SANDBOX_API_BASE_URL``; default ``api_base_url``)."""
    mode: Mode = "poll"
    sandboxes: BackendSettings = field(default_factory=lambda: BackendSettings(
        data_dir=Path("environment-data"), installation="environments", modal_app="research-agent-environments"))
    """The sandbox backend (``ENVIRONMENT_BACKEND``, ``ENVIRONMENT_DATA_DIR``, ``ENVIRONMENT_DOCKER_*``, ...)."""
    redis_url: str | None = field(default=None, repr=False)
    idle_seconds: float = 900.0
    """A sandbox whose runner has ended is stopped after this long (files kept)."""
    archive_seconds: float = 7 * 24 * 3600.0
    """An ended session's files are kept this long after its sandbox goes (0: removed with it)."""
    janitor_seconds: float = 30.0
    reclaim_ms: int = 10_000
    """Items polled but not acknowledged for this long are delivered again."""
    block_ms: int = MAX_BLOCK_MS
    runner_max_idle_seconds: float = 60.0
    """The runner ends once its session has been idle this long (the SDK's ``max_idle``)."""
    lock_seconds: float = 120.0
    """How long a per-session lock is held at most (a crashed holder's lock lapses)."""
    retry_attempts: int = 5
    retry_max_seconds: float = 30.0
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_drain_seconds: float = 60.0
    """Webhook mode drains the queue this often even without a delivery (the safety net)."""
    host: str = "0.0.0.0"
    port: int = 8090
    http: HttpLimits = field(default_factory=HttpLimits)
    """The webhook receiver's header deadline and size, keep-alive (``ENVIRONMENT_HTTP_*``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EnvironmentSettings:
        env = os.environ if env is None else env
        environment_id = optional_setting(env, "ANTHROPIC_ENVIRONMENT_ID")
        if environment_id is None:
            raise ConfigError("ANTHROPIC_ENVIRONMENT_ID is required: the id of the self-hosted environment (env_...)")
        key = _secret(env, "ANTHROPIC_ENVIRONMENT_KEY")
        if key is None:
            raise ConfigError("the environment key is required: set ANTHROPIC_ENVIRONMENT_KEY_FILE or "
                              "ANTHROPIC_ENVIRONMENT_KEY")
        api = _url(env, "ANTHROPIC_BASE_URL")
        settings = cls(
            environment_id=environment_id,
            environment_key=key,
            api_base_url=api,
            sandbox_api_base_url=_url(env, "ENVIRONMENT_SANDBOX_API_BASE_URL") or api,
            mode=choice_setting(env, "ENVIRONMENT_MODE", MODES),
            sandboxes=BackendSettings.from_env(env, "ENVIRONMENT_", data_dir=Path("environment-data"),
                                               installation="environments", modal_app="research-agent-environments",
                                               start_timeout_seconds=120.0),
            redis_url=optional_setting(env, "ENVIRONMENT_REDIS_URL"),
            idle_seconds=float_setting(env, "ENVIRONMENT_IDLE_SECONDS", cls.idle_seconds),
            archive_seconds=float_setting(env, "ENVIRONMENT_ARCHIVE_SECONDS", cls.archive_seconds),
            janitor_seconds=float_setting(env, "ENVIRONMENT_JANITOR_SECONDS", cls.janitor_seconds),
            reclaim_ms=int_setting(env, "ENVIRONMENT_RECLAIM_MS", cls.reclaim_ms, minimum=1),
            block_ms=int_setting(env, "ENVIRONMENT_POLL_BLOCK_MS", cls.block_ms, minimum=1),
            runner_max_idle_seconds=float_setting(env, "ENVIRONMENT_RUNNER_MAX_IDLE_SECONDS",
                                                  cls.runner_max_idle_seconds),
            lock_seconds=float_setting(env, "ENVIRONMENT_LOCK_SECONDS", cls.lock_seconds),
            retry_attempts=int_setting(env, "ENVIRONMENT_RETRY_ATTEMPTS", cls.retry_attempts, minimum=1),
            retry_max_seconds=float_setting(env, "ENVIRONMENT_RETRY_MAX_SECONDS", cls.retry_max_seconds),
            webhook_secret=_secret(env, "ENVIRONMENT_WEBHOOK_SECRET"),
            webhook_drain_seconds=float_setting(env, "ENVIRONMENT_WEBHOOK_DRAIN_SECONDS", cls.webhook_drain_seconds),
            host=env.get("HOST", "").strip() or cls.host,
            port=int_setting(env, "PORT", cls.port, minimum=1),
            http=HttpLimits.from_env(env, "ENVIRONMENT_"),
        )
        if settings.block_ms > MAX_BLOCK_MS:
            raise ConfigError(f"ENVIRONMENT_POLL_BLOCK_MS must be at most {MAX_BLOCK_MS} (the API's limit)")
        if settings.redis_url is not None and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("ENVIRONMENT_REDIS_URL must start with redis://, rediss:// or unix://")
        if settings.mode == "webhook" and settings.webhook_secret is None:
            raise ConfigError("webhook mode needs the signing secret: set ENVIRONMENT_WEBHOOK_SECRET_FILE or "
                              "ENVIRONMENT_WEBHOOK_SECRET (whsec_...)")
        if settings.janitor_seconds <= 0:
            raise ConfigError("ENVIRONMENT_JANITOR_SECONDS must be > 0")
        if settings.sandboxes.backend == "kubernetes":
            template_error = runner_pod_template_error(settings.sandboxes.kubernetes_pod_template)
            if template_error:
                raise ConfigError(f"ENVIRONMENT_KUBERNETES_POD_TEMPLATE: {template_error}")
        return settings
