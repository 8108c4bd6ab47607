"""The protocol every durable session store implements: the SDK's ``SessionStore``, and fencing.

Apart from :mod:`hosting.stores` because it subclasses the SDK's protocol: only the
server and the adapters, which load the SDK anyway, import it.
"""

from __future__ import annotations

from typing import Protocol

from claude_agent_sdk import SessionStore
from claude_agent_sdk.types import SessionKey, SessionStoreEntry


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
        """Round-trip to the server; raise :class:`~hosting.errors.StoreUnavailable` if down."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
