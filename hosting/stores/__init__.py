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
the scheme actually used.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from claude_agent_sdk import SessionStore
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

__all__ = ["DurableSessionStore", "Fenced", "MissingStoreDriver", "StoreUnavailableError", "open_session_store"]

_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


class MissingStoreDriver(RuntimeError):
    """The store's driver is an optional extra that is not installed."""


class StoreUnavailableError(ConnectionError):
    """The store's server cannot be reached (raised by ``ping()``)."""


class Fenced(Exception):
    """A write carried an epoch older than the session's: the writer was replaced."""


class DurableSessionStore(SessionStore, Protocol):
    """A ``SessionStore`` with the lifecycle hooks a server needs, and fencing.

    Fencing: each assignment of a session to a sandbox has an *epoch* (a number that
    only grows, handed out by the gateway). :meth:`fence` raises the session's epoch
    in the store; an append carrying ``epoch=`` lands only if no newer epoch was seen,
    checked and written in one atomic step, and raises :class:`Fenced` otherwise. So
    once a new sandbox has fenced the session, the replaced one cannot write to it.
    """

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry], *, epoch: int | None = None) -> None:
        """The protocol's append; with ``epoch``, refused (:class:`Fenced`) if a newer one was seen."""
        ...

    async def fence(self, key: SessionKey, epoch: int) -> bool:
        """Raise the session's epoch to ``epoch``; ``False`` (nothing changed) if it is newer already."""
        ...

    async def ping(self) -> None:
        """Round-trip to the server; raise :class:`StoreUnavailableError` if down."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


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
