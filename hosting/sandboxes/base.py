"""The cut-off between the gateway and whatever runs sandboxes.

A *sandbox* is one isolated agent server (``hosting.server``) serving one
session (or, in the gateway's tenant scope, up to :attr:`SandboxSpec.session_capacity`
sessions of one tenant), reachable over HTTP at an address, behind its own bearer token. A
*backend* starts, finds and removes sandboxes on one engine: local processes,
Docker containers, Kubernetes pods, Modal Sandboxes.

What a backend does, and what it leaves to the gateway:

- It **does** run servers, give each one the environment in its
  :class:`SandboxSpec`, attach the spec's *volume* (the durable place of a
  session's conversation: a directory, a Docker volume, a Modal Volume) at the
  server's data dir, and report what exists.
- It **does not** route, authenticate tenants, hold locks or decide when to
  start or stop anything: the gateway's routing store and pool do that, once,
  for every backend. A backend keeps no state a second gateway replica could
  not rebuild from :meth:`SandboxBackend.list`.

Every method is safe to call from several gateway replicas at once, and
idempotent where that makes sense (deleting what is gone is not an error).
"""

from __future__ import annotations

import abc
import asyncio
import enum
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

SERVER_PORT = 8000
"""The port the server listens on inside a sandbox that has its own network."""

SANDBOX_ID_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
"""1-40 of ``[a-z0-9-]``, starting and ending with a letter or digit: valid as a
file name, container name, pod name (DNS-1123 label) and label value."""
VOLUME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""1-64 of ``[A-Za-z0-9_.-]``, starting with a letter or digit (so never ``.`` or
``..``): valid as a directory name and, behind a prefix, as a Docker or Modal volume name."""
TOKEN_PATTERN = re.compile(r"[!-~]+")
"""Visible ASCII only: the token travels in an ``Authorization`` header. Never empty,
because a server started with an empty ``AGENT_AUTH_TOKEN`` would serve anyone."""


def check_sandbox_id(sandbox_id: str) -> str:
    """``sandbox_id`` if it matches :data:`SANDBOX_ID_PATTERN`; :class:`ValueError` otherwise.
    Backends check ids they are handed so that none can name a path or object outside their own."""
    if not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
        raise ValueError(f"invalid sandbox id {sandbox_id!r}: 1-40 of [a-z0-9-], starting and ending with a letter or digit")
    return sandbox_id


def check_volume(volume: str) -> str:
    """``volume`` if it matches :data:`VOLUME_PATTERN`; :class:`ValueError` otherwise."""
    if not VOLUME_PATTERN.fullmatch(volume):
        raise ValueError(f"invalid volume name {volume!r}: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit")
    return volume


class SandboxError(RuntimeError):
    """A backend could not do what was asked (start, reach, remove); the message says why."""


class Health(enum.Enum):
    """What :meth:`SandboxBackend.health` saw."""

    READY = "ready"
    """``GET /ready`` answered 200: a turn could start now."""
    STARTING = "starting"
    """It exists but is not ready (yet), is draining, or does not answer (yet)."""
    GONE = "gone"
    """It does not exist any more (crashed, killed or deleted)."""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a sandbox is created from. Backends add nothing of their own but
    where the server listens and where the volume is mounted (and, at most, a tag
    that lets them recognise their own processes). Invalid names or an empty token
    raise :class:`ValueError` here, before any backend sees them."""

    sandbox_id: str
    """Unique, :data:`SANDBOX_ID_PATTERN`: valid as a process tag, file name,
    container name, pod name or label value."""
    volume: str
    """Name of the durable storage mounted at the server's data dir (:data:`VOLUME_PATTERN`);
    it outlives the sandbox."""
    token: str = field(repr=False)
    """The per-sandbox bearer token (``AGENT_AUTH_TOKEN``, :data:`TOKEN_PATTERN`); never logged."""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Server environment (model endpoint, credentials, ``MODEL``, ...), allowlisted by the gateway."""
    session_id: str | None = None
    """The session it is created for; ``None`` for a warm-pool sandbox."""
    tenant: str | None = None
    prewarm: bool = True
    """Start a CLI ahead of the first turn; ``False`` for a sandbox whose server takes no
    turns (a self-hosted environment's, where the runner does the work)."""
    session_capacity: int | None = 1
    """The most sessions its server will hold (``AGENT_SESSION_CAPACITY``); ``None``: no limit."""

    def __post_init__(self) -> None:
        check_sandbox_id(self.sandbox_id)
        check_volume(self.volume)
        if not TOKEN_PATTERN.fullmatch(self.token):
            raise ValueError("the sandbox token must be non-empty visible ASCII")

    def server_env(self, *, host: str, port: int, data_dir: str) -> dict[str, str]:
        """The environment the server inside is started with: the spec's, then what
        every sandbox shares, and its CLIs (:meth:`_cli_env`)."""
        env = {
            **self.env,
            "AGENT_AUTH_TOKEN": self.token,
            "AGENT_DATA_DIR": data_dir,
            **self._cli_env(),
            "HOST": host,
            "PORT": str(port),
        }
        if self.session_capacity is not None:
            env["AGENT_SESSION_CAPACITY"] = str(self.session_capacity)
        return env

    def _cli_env(self) -> dict[str, str]:
        """A sandbox of one session pre-starts one CLI and keeps one warm. One shared by
        several sessions pre-starts two, so that two new sessions arriving at once both find
        one, and keeps as many warm as its memory holds: the server sizes that from its
        limit (``AGENT_WARM_SESSIONS`` set here would win over the limit, and a box too small
        for every session's CLI would then be OOM-killed instead of closing the idlest)."""
        if not self.prewarm:
            return {"AGENT_PREWARM": "0", "AGENT_WARM_SESSIONS": "0"}
        if self.session_capacity == 1:
            return {"AGENT_PREWARM": "1", "AGENT_WARM_SESSIONS": "1"}
        return {"AGENT_PREWARM": "2"}


@dataclass(frozen=True)
class Sandbox:
    """A sandbox that exists (or existed), as its backend reports it."""

    sandbox_id: str
    backend: str
    address: str
    """Base URL of its server, e.g. ``http://127.0.0.1:40123``."""
    volume: str
    session_id: str | None = None
    tenant: str | None = None
    created_at: float = field(default_factory=time.time)
    pid: int | None = None
    """The server's process id (``local`` only)."""


@dataclass(frozen=True)
class CommandResult:
    """What :meth:`SandboxBackend.run_command` saw: the exit status and the output
    (stdout and stderr together, decoded leniently)."""

    exit_code: int
    output: str


class SandboxBackend(abc.ABC):
    """One engine that runs sandboxes. Subclasses implement the abstract methods."""

    name: str
    _probe: httpx.AsyncClient | None = None

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Start a sandbox for ``spec`` and return once it has been started (it may
        not be ready yet: see :meth:`wait_ready`). Creates ``spec.volume`` if it does
        not exist, reuses it if it does. Raises :class:`SandboxError` if it cannot
        start (or a sandbox with that id exists); then nothing of it is left running,
        and a volume this call created is removed again. If the caller is cancelled,
        a sandbox that still comes up is deleted."""

    @abc.abstractmethod
    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        """Stop and remove the sandbox (a few seconds' grace, then killed; ``at_once``: killed
        without the grace, for one that answers nothing and so has nothing to drain). Its
        volume stays. Deleting one that is gone, or that belongs to another installation, is
        not an error: it is left alone."""

    @abc.abstractmethod
    async def delete_volume(self, volume: str) -> None:
        """Remove a volume (the session's conversation on local storage). The caller has
        deleted every sandbox using it: if one still does, :class:`SandboxError` and the
        volume stays. Deleting one that is gone is not an error."""

    @abc.abstractmethod
    async def list(self) -> list[Sandbox]:
        """Every sandbox of this backend (and of this gateway's installation) that
        exists now, for reconciliation at start-up and the admin API."""

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        """Mark a warm-pool sandbox as serving ``session_id``, atomically on the engine
        where the engine records it (Kubernetes labels, the local backend's records);
        ``None`` if someone else claimed it first or it is gone. The gateway's routing
        store has already taken it out of the pool; backends whose engine records
        nothing (Docker labels cannot change) just return the updated record."""
        return Sandbox(sandbox.sandbox_id, sandbox.backend, sandbox.address, sandbox.volume,
                       session_id, tenant, sandbox.created_at, sandbox.pid)

    async def health(self, sandbox: Sandbox, token: str, timeout: float = 2.0) -> Health:
        """Ask the sandbox's server ``GET /ready``: never touches the model.

        Anything but a 200 asks the engine whether the sandbox still exists: an answer
        may come from another process that took a dead sandbox's port (a 401 from
        another sandbox's server), and that must read ``GONE``, not ``STARTING``."""
        response = await self.ask_ready(sandbox.address, token, timeout)
        if response is not None and response.status_code == 200:
            return Health.READY
        return Health.STARTING if await self.exists(sandbox.sandbox_id) else Health.GONE

    async def ask_ready(self, address: str, token: str, timeout: float = 2.0) -> httpx.Response | None:
        """``GET /ready`` of the server at ``address`` (read whole); ``None`` if it could
        not be reached. Every probe of a sandbox goes through here, on one client: each
        new client builds a TLS context."""
        if self._probe is None:
            self._probe = httpx.AsyncClient()
        try:
            return await self._probe.get(f"{address}/ready", headers={"authorization": f"Bearer {token}"},
                                         timeout=timeout)
        except httpx.HTTPError:
            return None

    async def exists(self, sandbox_id: str) -> bool:
        """Whether the sandbox still exists on the engine (running or starting)."""
        return any(s.sandbox_id == sandbox_id for s in await self.list())

    async def wait_ready(self, sandbox: Sandbox, token: str, timeout: float) -> None:
        """Return once :meth:`health` is ``READY``; raise :class:`SandboxError` if the
        sandbox is gone or not ready within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            state = await self.health(sandbox, token)
            if state is Health.READY:
                return
            if state is Health.GONE:
                raise SandboxError(f"sandbox {sandbox.sandbox_id} exited before it was ready")
            if time.monotonic() + delay > deadline:
                raise SandboxError(f"sandbox {sandbox.sandbox_id} not ready after {timeout:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def wait_warm(self, sandbox: Sandbox, token: str, timeout: float) -> bool:
        """Wait until the sandbox's server has started its pre-started CLI (``/ready``
        reports ``prewarmed`` at ``prewarm_target``, which is 0 for a server that starts
        none: with a session store), so that a warm-pool sandbox answers its first turn
        without spawning anything. ``False`` if that did not happen within
        ``timeout`` seconds: the sandbox still works, its first turn just starts a CLI."""
        deadline = time.monotonic() + timeout
        delay = 0.05  # a CLI starts in about a second, or much later on a busy box: back off
        while True:
            response = await self.ask_ready(sandbox.address, token)
            try:
                status = response.json() if response is not None and response.status_code == 200 else {}
            except ValueError:
                status = {}
            if status.get("prewarmed", 0) >= status.get("prewarm_target", 1):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def run_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> CommandResult:
        """Run ``argv`` inside a running sandbox and wait for it: as the sandbox's user, in its
        data dir, with ``env`` added to what the sandbox's own processes get (``python3`` is the
        sandbox's interpreter, ``hosting`` importable). :class:`SandboxError` if the sandbox is
        not running, the command cannot start, or it has not ended after ``timeout`` seconds.
        Optional: a backend that cannot (the in-memory one) raises :class:`SandboxError`."""
        raise SandboxError(f"the {self.name} backend cannot run commands in a sandbox")

    async def start_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` as :meth:`run_command` does and return once it has started. It runs
        until it exits or the sandbox is deleted (deleting a sandbox ends its commands), not
        bound to the caller. The backend keeps no record of it: a command that must be found
        again records itself in the data dir (as :mod:`hosting.environments.runner` does)."""
        raise SandboxError(f"the {self.name} backend cannot run commands in a sandbox")

    async def aclose(self) -> None:
        """Release the backend's own resources (clients, connections). Sandboxes stay.
        Subclasses that hold more call this too."""
        if self._probe is not None:
            await self._probe.aclose()
            self._probe = None
