"""Durable :class:`~claude_agent_sdk.SessionStore` adapters (Redis, Postgres).

The agent's CLI writes its transcript to local disk, and in the hosted tiers
that disk belongs to a sandbox or container that is thrown away after the
turn, the idle timeout or a crash. A session has to outlive its sandbox so a
later request (possibly served by another replica) can resume it, so the SDK
mirrors every transcript batch into a ``SessionStore`` and materializes it
again on resume. These adapters put that mirror in Redis or Postgres.

Retention is the adapter's job (the SDK never deletes on its own): both take
``ttl_seconds`` (``None`` keeps sessions forever) and forget a session that
has seen no append for that long; see each adapter for how.

The drivers are the optional ``stores`` extra, so they are imported only for
the scheme actually used; this module imports neither them nor the SDK (the
protocol is :mod:`hosting.stores.protocol`), so the gateway can name a store
without loading the agent SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from hosting.settings_env import ConfigError, optional_setting

if TYPE_CHECKING:
    from hosting.stores.protocol import DurableSessionStore

__all__ = ["Fenced", "MissingStoreDriver", "open_session_store", "store_url_setting"]

_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


class MissingStoreDriver(RuntimeError):
    """The store's driver is an optional extra that is not installed."""


class Fenced(Exception):
    """A write carried an epoch older than the session's: the writer was replaced."""


STORE_SCHEMES = ("redis://", "rediss://", "postgresql://", "postgres://")


def store_url_setting(env: Mapping[str, str]) -> str | None:
    """``AGENT_SESSION_STORE``, read by the server and the gateway alike."""
    url = optional_setting(env, "AGENT_SESSION_STORE")
    if url is not None and not url.startswith(STORE_SCHEMES):
        raise ConfigError(f"AGENT_SESSION_STORE must start with one of {', '.join(STORE_SCHEMES)}")
    return url


def validate_ttl(ttl_seconds: int | None) -> int | None:
    """Reject TTLs that would silently mean "expire at once" or "never"."""
    if ttl_seconds is not None and (
        isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
    ):
        raise ValueError(f"ttl_seconds must be a positive int or None, got {ttl_seconds!r}")
    return ttl_seconds


def open_session_store(url: str, *, ttl_seconds: int | None) -> DurableSessionStore:
    """Build the adapter for ``url``'s scheme.

    No connection is made here; call ``await store.ping()`` at startup to fail
    fast, and ``await store.aclose()`` at shutdown.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in _REDIS_SCHEMES:
        from .redis_store import RedisSessionStore

        return RedisSessionStore(url, ttl_seconds=ttl_seconds)
    if scheme in _POSTGRES_SCHEMES:
        try:
            from .postgres_store import PostgresSessionStore
        except ModuleNotFoundError as exc:
            raise MissingStoreDriver(
                f"a postgresql:// session store needs the PostgreSQL driver ({exc.name} is not installed): "
                'pip install "research-agent-hosting[stores]"'
            ) from None

        return PostgresSessionStore(url, ttl_seconds=ttl_seconds)
    accepted = ", ".join(f"{s}://" for s in sorted(_REDIS_SCHEMES | _POSTGRES_SCHEMES))
    # Only the scheme is echoed: the URL may carry a password.
    raise ValueError(f"unsupported session store URL scheme {scheme!r}; accepted: {accepted}")
