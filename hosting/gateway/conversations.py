"""The gateway's own hold on the session store, and sandboxes that hold a narrow one.

With a session store (``AGENT_SESSION_STORE`` in the gateway's environment) a
conversation outlives its sandbox. The URL the gateway is given is its own
(an admin of the store): it never reaches a sandbox. Instead every sandbox gets a
store user of its own (:mod:`hosting.stores.access`: a Redis ACL user, or a
PostgreSQL role under row-level security), made when the sandbox is created and
granted the one session it serves when it is assigned (created for the session,
or claimed from the warm pool), removed with the sandbox. So code running in a
sandbox can read and write its own session's entries and nothing else. In tenant
scope a sandbox serves the sessions of one volume, all of one tenant, and its user
is granted exactly those (:mod:`hosting.gateway.tenant_scope`).

The gateway itself uses the store only for what no sandbox may do: removing a
whole session for retention, and filing conversations stored before session ids
were per tenant under their tenant's id (:meth:`StoredConversations.adopt`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import httpx

from hosting.contract import STORE_PROJECT_KEY, durable_session_id
from hosting.sandboxes.base import (
    CommandResult,
    Health,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
)
from hosting.stores import open_session_store
from hosting.stores.access import SandboxStoreAccess, StoreAccessError, open_sandbox_access

if TYPE_CHECKING:  # a TypedDict: the gateway never loads the agent SDK at run time
    from claude_agent_sdk.types import SessionKey

logger = logging.getLogger("hosting.gateway.conversations")

STORE_URL_VARIABLE = "AGENT_SESSION_STORE"


def namespace(installation: str, tenant: str) -> str:
    """Whose session ids a sandbox serves (:data:`hosting.contract.NAMESPACE_HEADER`)."""
    return f"{installation}/{tenant}"


class StoredConversations:
    """What the gateway does to stored conversations with its own credential. Any failure
    of the store raises :class:`ConnectionError` naming only the driver's error type (its
    message may carry the store's address)."""

    def __init__(self, url: str, installation: str) -> None:
        self._store = open_session_store(url, ttl_seconds=None)
        self.installation = installation
        self.access: SandboxStoreAccess = open_sandbox_access(url, installation)

    def stored_id(self, tenant: str, session_id: str) -> str:
        return durable_session_id(session_id, namespace(self.installation, tenant))

    async def delete(self, tenant: str, session_id: str) -> None:
        """Remove the tenant's session from the store (retention; nothing if absent)."""
        key: SessionKey = {"project_key": STORE_PROJECT_KEY, "session_id": self.stored_id(tenant, session_id)}
        with _unavailable():
            await self._store.delete(key)

    async def adopt(self, tenant: str, session_id: str) -> bool:
        """File a conversation stored under the session id alone (before ids were per
        tenant) under the tenant's id, the route's owner; ``True`` if there was one.
        Copied first, removed after: a crash in between leaves two copies, never none."""
        with _unavailable():
            return await self._adopt(tenant, session_id)

    async def _adopt(self, tenant: str, session_id: str) -> bool:
        old_id, new_id = durable_session_id(session_id), self.stored_id(tenant, session_id)
        old: SessionKey = {"project_key": STORE_PROJECT_KEY, "session_id": old_id}
        new: SessionKey = {"project_key": STORE_PROJECT_KEY, "session_id": new_id}
        entries = await self._store.load(old)
        if not entries:
            return False
        await self._store.append(new, entries)
        for subpath in await self._store.list_subkeys({"project_key": STORE_PROJECT_KEY, "session_id": old_id}):
            if sub := await self._store.load({**old, "subpath": subpath}):
                await self._store.append({**new, "subpath": subpath}, sub)
        await self._store.delete(old)
        return True

    async def aclose(self) -> None:
        await self.access.aclose()
        await self._store.aclose()


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
        raise ConnectionError(f"session store unavailable ({type(exc).__name__})") from None


class CredentialedBackend(SandboxBackend):
    """A backend whose sandboxes each get a store credential for their own sessions only.

    Wraps the engine's backend (every other call goes straight through): the
    credential is made before the sandbox starts (it is in the sandbox's environment
    from its first moment, warm-pool sandboxes included, with no rights yet), granted
    the session on assignment (:meth:`create` for a session, :meth:`claim`; in tenant
    scope :meth:`grant_sessions`, with its volume's sessions), and removed after the
    sandbox is deleted."""

    def __init__(self, inner: SandboxBackend, conversations: StoredConversations) -> None:
        self.inner = inner
        self.name = inner.name
        self._conversations = conversations
        self._access = conversations.access
        self._prepared = False

    async def prepare(self) -> None:
        """Set the store up for sandbox users (once; at start-up, or before the first
        credential if the store was down then)."""
        if not self._prepared:
            try:
                await self._access.prepare()
            except (StoreAccessError, ConnectionError) as exc:
                raise SandboxError(f"could not prepare the session store for sandbox credentials: {exc}") from None
            self._prepared = True

    async def grant_sessions(self, sandbox_id: str, tenant: str, session_ids: Collection[str]) -> None:
        """From now on the sandbox's credential reaches exactly these sessions of the tenant:
        the one it serves, or in tenant scope those of its volume
        (:mod:`hosting.gateway.tenant_scope`). :class:`SandboxError` if the store refuses."""
        try:
            await self._access.grant(sandbox_id, [self._conversations.stored_id(tenant, s) for s in session_ids])
        except (StoreAccessError, ConnectionError) as exc:
            raise SandboxError(f"could not grant sandbox {sandbox_id} its sessions in the store: {exc}") from None

    async def create(self, spec: SandboxSpec) -> Sandbox:
        await self.prepare()
        try:
            url = await self._access.create(spec.sandbox_id)
        except (StoreAccessError, ConnectionError) as exc:
            raise SandboxError(f"could not make a store credential for sandbox {spec.sandbox_id}: {exc}") from None
        try:
            if spec.session_id is not None and spec.tenant is not None:
                await self.grant_sessions(spec.sandbox_id, spec.tenant, [spec.session_id])
            return await self.inner.create(replace(spec, env={**spec.env, STORE_URL_VARIABLE: url}))
        except BaseException:
            await self._forget(spec.sandbox_id)
            raise

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        claimed = await self.inner.claim(sandbox, session_id, tenant)
        if claimed is None:
            return None
        try:
            await self.grant_sessions(sandbox.sandbox_id, tenant, [session_id])
        except SandboxError as exc:
            # Out of the pool and of no use: remove it, as if someone else had claimed it.
            logger.warning("%s; removing the sandbox", exc)
            await self.delete(sandbox.sandbox_id)
            return None
        return claimed

    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        await self.inner.delete(sandbox_id, at_once=at_once)
        await self._forget(sandbox_id)

    async def _forget(self, sandbox_id: str) -> None:
        try:
            await self._access.delete(sandbox_id)
        except (StoreAccessError, ConnectionError) as exc:
            # Removed at the next start-up's reconciliation (remove_orphan_credentials).
            logger.warning("could not remove the store credential of sandbox %s: %s", sandbox_id, exc)

    async def remove_orphan_credentials(self) -> list[str]:
        """Remove the credentials of sandboxes that no longer exist (start-up)."""
        existing = {sandbox.sandbox_id for sandbox in await self.inner.list()}
        try:
            users = await self._access.sandboxes()
        except (StoreAccessError, ConnectionError) as exc:
            raise SandboxError(f"could not list the sandboxes' store credentials: {exc}") from None
        orphans = [sandbox_id for sandbox_id in users if sandbox_id not in existing]
        for sandbox_id in orphans:
            await self._forget(sandbox_id)
        return orphans

    async def delete_volume(self, volume: str) -> None:
        await self.inner.delete_volume(volume)

    async def list(self) -> list[Sandbox]:
        return await self.inner.list()

    async def health(self, sandbox: Sandbox, token: str, timeout: float = 2.0) -> Health:
        return await self.inner.health(sandbox, token, timeout)

    async def exists(self, sandbox_id: str) -> bool:
        return await self.inner.exists(sandbox_id)

    async def wait_ready(self, sandbox: Sandbox, token: str, timeout: float) -> None:
        await self.inner.wait_ready(sandbox, token, timeout)

    async def wait_warm(self, sandbox: Sandbox, token: str, timeout: float) -> bool:
        return await self.inner.wait_warm(sandbox, token, timeout)

    async def ask_ready(self, address: str, token: str, timeout: float = 2.0) -> httpx.Response | None:
        return await self.inner.ask_ready(address, token, timeout)

    async def run_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> CommandResult:
        return await self.inner.run_command(sandbox_id, argv, env, timeout)

    async def start_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        await self.inner.start_command(sandbox_id, argv, env)

    async def aclose(self) -> None:
        await self.inner.aclose()
