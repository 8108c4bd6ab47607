"""What the routing store keeps: routes (one per tenant's session), pool entries, and in
tenant scope the volumes that sessions share.

A session is one tenant's: routes are keyed by (tenant, session id) (:func:`route_key`),
so two tenants using the same id have two routes, two conversations, and (in either
scope) two sandboxes, and neither can tell that the other exists.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

from hosting.sandboxes.base import Sandbox


def route_key(tenant: str, session_id: str) -> str:
    """The key of one tenant's session. Neither tenant names nor session ids hold ``/``,
    so no two (tenant, session) pairs share a key."""
    return f"{tenant}/{session_id}"


@dataclass(frozen=True)
class Route:
    """One session: its owner, the volume holding its conversation, and the sandbox
    serving it now (``None`` once reaped or lost: the next turn gets a new one)."""

    session_id: str
    tenant: str
    volume: str
    sandbox_id: str | None = None
    address: str | None = None
    token: str | None = field(default=None, repr=False)
    pid: int | None = None
    last_activity: float = field(default_factory=time.time)
    epoch: int = 0
    """Which assignment of the session to a sandbox this is; grows with each one (see
    :meth:`with_sandbox`). Sent to the sandbox with every request (:data:`EPOCH_HEADER`):
    its session store refuses writes carrying an older one, so a replaced sandbox that
    wakes up cannot write over the conversation."""

    @property
    def key(self) -> str:
        """:func:`route_key` of the route's tenant and session."""
        return route_key(self.tenant, self.session_id)

    @property
    def state(self) -> str:
        return "assigned" if self.sandbox_id else "released"

    def with_sandbox(self, sandbox: Sandbox, token: str) -> Route:
        """Assigned to ``sandbox``, under a new epoch: milliseconds since the Unix epoch, past
        the last one. A clock, not a counter, so that a route lost with the routing store
        and made again still gets an epoch above every one used before (within the clock
        skew between gateway replicas, far below the time a replacement takes)."""
        return replace(self, sandbox_id=sandbox.sandbox_id, address=sandbox.address, token=token,
                       pid=sandbox.pid, last_activity=time.time(),
                       epoch=max(self.epoch + 1, int(time.time() * 1000)))

    def released(self) -> Route:
        return replace(self, sandbox_id=None, address=None, token=None, pid=None)


@dataclass(frozen=True)
class PoolEntry:
    """A started, ready sandbox waiting for a session, with its bearer token."""

    sandbox: Sandbox
    token: str = field(repr=False)

    def to_json(self) -> str:
        return json.dumps({"sandbox": asdict(self.sandbox), "token": self.token})

    @classmethod
    def from_json(cls, raw: str | bytes) -> PoolEntry:
        data = json.loads(raw)
        return cls(Sandbox(**data["sandbox"]), data["token"])


@dataclass(frozen=True)
class SharedVolume:
    """A volume of tenant scope (:mod:`hosting.gateway.tenant_scope`): the sessions of one
    tenant that keep their conversations on it (its seats), and the one sandbox serving
    them now (``None`` once reaped or lost: the next turn of any of them starts one)."""

    tenant: str
    volume: str
    seats: tuple[str, ...] = ()
    """Its sessions' ids, assigned or released: a session keeps its seat (and volume) for
    life, and frees it only when it is deleted."""
    sandbox: Sandbox | None = None
    token: str | None = field(default=None, repr=False)
    purge: tuple[str, ...] = ()
    """Sessions deleted while no sandbox ran here: their files are still on the volume, so
    the next sandbox started on it deletes them before it serves anyone, and no new
    session of the same id is seated here until then."""

    @property
    def sandbox_id(self) -> str | None:
        return self.sandbox.sandbox_id if self.sandbox is not None else None

    def seated(self, session_id: str) -> SharedVolume:
        return self if session_id in self.seats else replace(self, seats=(*self.seats, session_id))

    def unseated(self, session_id: str, *, purge: bool) -> SharedVolume:
        """Without the session's seat; ``purge``: its files are left for the next sandbox to delete."""
        return replace(self, seats=tuple(s for s in self.seats if s != session_id),
                       purge=(*self.purge, session_id) if purge and session_id not in self.purge else self.purge)

    def with_sandbox(self, sandbox: Sandbox, token: str) -> SharedVolume:
        return replace(self, sandbox=sandbox, token=token)

    def without_sandbox(self) -> SharedVolume:
        return replace(self, sandbox=None, token=None)

    def to_json(self) -> str:
        return json.dumps({"tenant": self.tenant, "volume": self.volume, "seats": list(self.seats),
                           "sandbox": asdict(self.sandbox) if self.sandbox is not None else None,
                           "token": self.token, "purge": list(self.purge)})

    @classmethod
    def from_json(cls, raw: str | bytes) -> SharedVolume:
        data = json.loads(raw)
        return cls(data["tenant"], data["volume"], tuple(data["seats"]),
                   Sandbox(**data["sandbox"]) if data["sandbox"] is not None else None, data["token"],
                   tuple(data["purge"]))
