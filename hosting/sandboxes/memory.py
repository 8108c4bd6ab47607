"""An in-memory backend for unit tests of the logic above the cut-off (routing,
provisioning, pool, reaper, reconciliation), with no processes and no HTTP.

It keeps the interface's promises the way a real engine does: a sandbox exists
from ``create`` until ``delete`` (or :meth:`MemoryBackend.kill`); its health is
read from that state, ``STARTING`` for a wrong token (what a real server's 401
reads as); a volume outlives its sandboxes and cannot be removed while one uses
it; a warm sandbox is claimed once. Share one instance between two gateway
objects to model two replicas on one engine.

Helpers let a test play the engine: :meth:`~MemoryBackend.kill` (it crashed),
:meth:`~MemoryBackend.set_health` (not ready yet, or draining),
:meth:`~MemoryBackend.fail_next_create`, :meth:`~MemoryBackend.spec_of`, the
``creates`` and ``deletes`` counters and the ``volumes`` it holds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from hosting.sandboxes.base import (
    Health,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
    check_sandbox_id,
    check_volume,
)


class MemoryBackend(SandboxBackend):
    """Sandboxes as records in a dict (see the module doc)."""

    name = "memory"

    def __init__(self) -> None:
        self.creates = 0
        """Sandboxes created."""
        self.deletes = 0
        """Calls of :meth:`delete`, whether or not the sandbox still existed, so a test
        sees the gateway clean up after a :meth:`kill`."""
        self.volumes: set[str] = set()
        """Volumes that exist: made by ``create``, removed only by ``delete_volume``."""
        self._sandboxes: dict[str, Sandbox] = {}
        self._specs: dict[str, SandboxSpec] = {}
        self._health: dict[str, Health] = {}
        self._fail_next: str | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        """Wake every :meth:`wait_ready`: it re-reads the state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def create(self, spec: SandboxSpec) -> Sandbox:
        if self._fail_next is not None:
            message, self._fail_next = self._fail_next, None
            raise SandboxError(message)
        if spec.sandbox_id in self._sandboxes:
            raise SandboxError(f"sandbox {spec.sandbox_id} exists already")
        sandbox = Sandbox(spec.sandbox_id, self.name, f"http://sandbox-{spec.sandbox_id}.memory.invalid",
                          spec.volume, spec.session_id, spec.tenant, time.time())
        self._sandboxes[spec.sandbox_id] = sandbox
        self._specs[spec.sandbox_id] = spec
        self.volumes.add(spec.volume)
        self.creates += 1
        self._notify()
        return sandbox

    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        check_sandbox_id(sandbox_id)
        self.deletes += 1
        self._forget(sandbox_id)

    async def delete_volume(self, volume: str) -> None:
        check_volume(volume)
        users = [s.sandbox_id for s in self._sandboxes.values() if s.volume == volume]
        if users:
            raise SandboxError(f"volume {volume} is in use by sandbox {', '.join(users)}")
        self.volumes.discard(volume)

    async def list(self) -> list[Sandbox]:
        return list(self._sandboxes.values())

    async def exists(self, sandbox_id: str) -> bool:
        return sandbox_id in self._sandboxes

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        current = self._sandboxes.get(sandbox.sandbox_id)
        if current is None or current.session_id is not None:
            return None
        claimed = replace(current, session_id=session_id, tenant=tenant)
        self._sandboxes[sandbox.sandbox_id] = claimed
        return claimed

    async def health(self, sandbox: Sandbox, token: str, timeout: float = 2.0) -> Health:
        spec = self._specs.get(sandbox.sandbox_id)
        if sandbox.sandbox_id not in self._sandboxes or spec is None:
            return Health.GONE
        if token != spec.token:
            return Health.STARTING
        return self._health.get(sandbox.sandbox_id, Health.READY)

    async def wait_ready(self, sandbox: Sandbox, token: str, timeout: float) -> None:
        """As the base, but woken by :meth:`set_health` and :meth:`kill` instead of polling."""
        deadline = time.monotonic() + timeout
        while True:
            changed = self._changed
            state = await self.health(sandbox, token)
            if state is Health.READY:
                return
            if state is Health.GONE:
                raise SandboxError(f"sandbox {sandbox.sandbox_id} exited before it was ready")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxError(f"sandbox {sandbox.sandbox_id} not ready after {timeout:.0f} s")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_warm(self, sandbox: Sandbox, token: str, timeout: float) -> bool:
        return await self.health(sandbox, token) is Health.READY

    def kill(self, sandbox_id: str) -> None:
        """The sandbox vanishes as if it crashed: ``GONE``, unlisted; its volume stays."""
        if sandbox_id not in self._sandboxes:
            raise KeyError(f"no sandbox {sandbox_id}")
        self._forget(sandbox_id)

    def set_health(self, sandbox_id: str, health: Health) -> None:
        """What :meth:`health` reports for the right token: ``STARTING`` (not ready yet,
        or draining) or ``READY`` again. Use :meth:`kill` for a sandbox that is gone."""
        if health is Health.GONE:
            raise ValueError("a sandbox that exists is not GONE: use kill()")
        if sandbox_id not in self._sandboxes:
            raise KeyError(f"no sandbox {sandbox_id}")
        self._health[sandbox_id] = health
        self._notify()

    def fail_next_create(self, message: str = "injected create failure") -> None:
        """The next :meth:`create` raises :class:`SandboxError` and makes nothing."""
        self._fail_next = message

    def spec_of(self, sandbox_id: str) -> SandboxSpec:
        """The spec a live sandbox was created from (its token, its environment)."""
        return self._specs[sandbox_id]

    def _forget(self, sandbox_id: str) -> None:
        self._sandboxes.pop(sandbox_id, None)
        self._specs.pop(sandbox_id, None)
        self._health.pop(sandbox_id, None)
        self._notify()
