"""The gateway's parts in either sandbox scope, on the in-memory backend, for the tests of
its logic (``tests/integration``): a sandbox per session, or sessions of a tenant sharing
sandboxes (``GATEWAY_SANDBOX_SCOPE=tenant``). A helper module, not a plugin."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hosting.gateway.conversations import StoredConversations
from hosting.gateway.pool import WarmPool
from hosting.gateway.pool_demand import PoolDemand, PoolSizing
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.reaper import Reaper, SessionRetention
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.records import Route
from hosting.gateway.tenant_scope import SharedSandboxes
from hosting.sandboxes.base import SandboxBackend

ENV = {"ANTHROPIC_API_KEY": "sk-x"}
SCOPES = ("session", "tenant")


@dataclass
class Erasures:
    """What the sandboxes' servers answer when tenant scope has them delete a session: 204
    from a sandbox that exists (each recorded), nothing from one that is gone."""

    backend: SandboxBackend
    erased: list[tuple[str, str]] = field(default_factory=list)
    """(sandbox id, session id) of every session a server deleted."""
    busy: set[str] = field(default_factory=set)
    """Sessions a turn runs on: their server answers 409."""

    async def delete_session(self, route: Route) -> int | None:
        await asyncio.sleep(0.01)  # a request to a server takes a moment: concurrent callers interleave
        if route.sandbox_id is None or not await self.backend.exists(route.sandbox_id):
            return None
        if route.session_id in self.busy:
            return 409
        self.erased.append((route.sandbox_id, route.session_id))
        return 204


@dataclass
class Scoped:
    """One gateway replica's parts in ``scope`` (every call builds them anew, as another
    replica sharing the backend and the store would)."""

    scope: str
    backend: SandboxBackend
    store: RoutingStore
    sessions_per_sandbox: int = 8
    conversations: StoredConversations | None = None
    erasures: Erasures = field(init=False)

    def __post_init__(self) -> None:
        self.erasures = Erasures(self.backend)

    def shared(self) -> SharedSandboxes | None:
        if self.scope == "session":
            return None
        return SharedSandboxes(self.backend, self.store, self.erasures, ENV, self.sessions_per_sandbox,
                               timeout_seconds=10, conversations=self.conversations)

    def provisioner(self, demand: PoolDemand | None = None) -> Provisioner:
        return Provisioner(self.backend, self.store, ENV, timeout_seconds=10, demand=demand, shared=self.shared())

    def fixed_pool(self, size: int) -> tuple[WarmPool, PoolDemand]:
        """A warm pool of ``size`` whatever the demand (its sandboxes made for this scope), and
        the demand its claims must go to."""
        demand = PoolDemand(self.store, PoolSizing(floor=size, ceiling=size))
        return WarmPool(self.backend, self.store, self.provisioner(demand), ENV, demand, lock_seconds=30,
                        session_capacity=self.session_capacity), demand

    def reaper(self, idle_timeout_seconds: float) -> Reaper:
        return Reaper(self.backend, self.store, idle_timeout_seconds, self.shared())

    def retention(self, ttl_seconds: float) -> SessionRetention:
        return SessionRetention(self.backend, self.store, self.conversations, ttl_seconds, self.shared())

    @property
    def session_capacity(self) -> int:
        return self.sessions_per_sandbox if self.scope == "tenant" else 1
