"""Sandboxes as Modal Sandboxes, and the one definition of the agent's Modal sandbox.

:func:`create_agent_sandbox` is that definition: the product image built from
``hosting/Dockerfile`` (context: the repository), running ``serve``, a Modal Volume at
``/data``, named Modal secrets and an environment, port 8000 behind an encrypted tunnel.
``hosting/modal/modal_app.py`` (one sandbox, deployed by hand) and :class:`ModalBackend`
(one sandbox per session, behind the gateway) both call it, so the two cannot drift.

The backend keeps its state in Modal only: each sandbox is named after its sandbox id
(names are unique among an app's running sandboxes, which makes a second create of one id
fail) and tagged with its sandbox id, installation, volume, session, tenant and creation
time; :meth:`ModalBackend.list` reads the tags back, so any gateway replica can rebuild
its routes from them. Tags can change, so a claim re-tags the sandbox, but not atomically:
the gateway's routing store is what makes a claim exclusive. A sandbox is addressed through
its tunnel, ``https://host:port``, with the per-sandbox token the gateway chose. Volumes are
named ``agent-<installation>-<volume>``, so one installation never mounts or removes another's.

Commands in a sandbox (:meth:`ModalBackend.run_command`, ``start_command``) are Modal execs:
the client reaches the sandbox's task command router with a token for that task, and sends
the command's environment in the request body (never in an argv), so a secret in ``env``
shows in no process list. They run as the image's user, in ``/data``, and end with the sandbox.

The ``modal`` client is pinned (``modal==1.6.4``): its control-plane API is Modal's own
and changes between releases. Its credentials come from ``modal setup`` or
``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from hosting.sandboxes._shared import finish_or_delete
from hosting.sandboxes.base import (
    SERVER_PORT,
    CommandResult,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
    check_sandbox_id,
    check_volume,
)

try:
    import modal
    import modal.config
    import modal.exception
except ImportError:
    _HAVE_SDK = False
else:
    _HAVE_SDK = True

SDK_MISSING = 'the Modal client is not installed: pip install "research-agent-hosting[modal]"'
NO_CREDENTIALS = "no Modal credentials: run `modal setup` or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
COMMAND = ("/app/hosting/entrypoint.sh", "serve")
"""The whole command: whether Modal keeps a Dockerfile's ENTRYPOINT for a sandbox or not, this starts the server."""
DATA_DIR = "/data"

SANDBOX_TAG = "research-agent.sandbox"
INSTALLATION_TAG = "research-agent.installation"
VOLUME_TAG = "research-agent.volume"
SESSION_TAG = "research-agent.session"
TENANT_TAG = "research-agent.tenant"
CREATED_TAG = "research-agent.created-at"

_T = TypeVar("_T")


def require_client() -> None:
    """:class:`SandboxError` saying how to install the Modal client if it is not: the one check
    the gateway's backend, ``modal_app.py`` and ``teardown.py`` make before any Modal call."""
    if not _HAVE_SDK:
        raise SandboxError(SDK_MISSING)


def require_credentials() -> None:
    """:class:`SandboxError` if the Modal client has no credentials to use. The client resolves
    them only at its first call (``modal.Client.from_env``), where a gateway would fail call after
    call in the background; this reads the same settings (``MODAL_TOKEN_*`` or the ``modal setup``
    profile, OAuth settings, or a Modal container's own) without contacting Modal."""
    config = modal.config.config
    if os.environ.get("MODAL_IS_REMOTE") == "1":  # inside a Modal container: the container's identity
        return
    if (config.get("token_id") and config.get("token_secret")) or config.get("oauth_refresh_token"):
        return
    raise SandboxError(NO_CREDENTIALS)


MAX_NAME = 64
"""Modal object names: at most 64 of ``[A-Za-z0-9_.-]``."""


def agent_image(dockerfile: Path = DOCKERFILE) -> modal.Image:
    """The product image, built by Modal from ``hosting/Dockerfile`` with the repository as context
    (Modal caches the build by its definition: an unchanged checkout builds once)."""
    if not dockerfile.is_file():
        raise SandboxError(f"{dockerfile} not found: Modal builds the agent image from a checkout of the repository")
    return modal.Image.from_dockerfile(dockerfile, context_dir=dockerfile.parent.parent)


async def create_agent_sandbox(app: modal.App, *, name: str, volume: str, token: str, env: Mapping[str, str],
                               secrets: Sequence[str] = (), tags: Mapping[str, str] | None = None,
                               timeout: int = 3600, idle_timeout: int | None = None,
                               image: modal.Image | None = None, memory_bytes: int = 1024**3,
                               cpus: float = 1.0) -> modal.Sandbox:
    """Start the agent's sandbox in ``app``: the server on port 8000 (encrypted tunnel), ``volume``
    (created if missing) at ``/data``, the Modal secrets named in ``secrets`` and ``env`` as its
    environment, ``token`` as ``AGENT_AUTH_TOKEN``. ``timeout`` caps its lifetime, ``idle_timeout``
    ends it when idle (Modal's rules). Named secrets are resolved before anything is created, so a
    missing one (``modal.exception.NotFoundError``) leaves nothing behind.

    ``memory_bytes`` and ``cpus`` are both the request and the hard limit (the hosting guide's
    1 GiB and 1 CPU by default): the server sizes its CLI pools to the limit it sees, so a
    sandbox without one would size itself to the whole Modal worker."""
    memory_mib = max(1, memory_bytes // 2**20)
    named_secrets = [modal.Secret.from_name(secret) for secret in secrets]
    for secret in named_secrets:
        await secret.hydrate.aio()
    server_env = {**env, "AGENT_AUTH_TOKEN": token, "AGENT_DATA_DIR": DATA_DIR, "HOST": "0.0.0.0",
                  "PORT": str(SERVER_PORT)}
    return await modal.Sandbox.create.aio(
        *COMMAND, app=app, name=name, tags=dict(tags or {}), image=image or agent_image(),
        env=dict(server_env), secrets=named_secrets,
        volumes={DATA_DIR: modal.Volume.from_name(volume, create_if_missing=True)},
        encrypted_ports=[SERVER_PORT], timeout=timeout, idle_timeout=idle_timeout,
        memory=(memory_mib, memory_mib), cpu=(cpus, cpus))


async def tunnel_url(sandbox: modal.Sandbox, timeout: int = 50) -> str:
    """The ``https://host:port`` of the sandbox's server."""
    tunnels = await sandbox.tunnels.aio(timeout=timeout)
    return tunnels[SERVER_PORT].url


def volume_name(installation: str, volume: str) -> str:
    """``agent-<installation>-<volume>``; a long one keeps its start and gets a digest of the whole."""
    name = f"agent-{installation}-{check_volume(volume)}"
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


class ModalBackend(SandboxBackend):
    """Modal Sandboxes in one Modal app (see the module doc)."""

    name = "modal"

    def __init__(self, app_name: str = "research-agent-gateway", installation: str = "default", *,
                 secrets: Sequence[str] = (), sandbox_timeout: int = 24 * 3600,
                 image: modal.Image | None = None, memory_bytes: int = 1024**3, cpus: float = 1.0) -> None:
        """``secrets``: Modal secrets every sandbox gets (e.g. the model credential).
        ``sandbox_timeout``: Modal's hard lifetime cap; the gateway's reaper removes idle ones
        long before. ``memory_bytes``, ``cpus``: each sandbox's limits (see :func:`create_agent_sandbox`).
        Raises :class:`SandboxError` without the Modal client, its credentials or ``hosting/Dockerfile``."""
        require_client()
        require_credentials()
        self.app_name = app_name
        self.installation = installation
        self._secrets = tuple(secrets)
        self._sandbox_timeout = sandbox_timeout
        self._memory_bytes, self._cpus = memory_bytes, cpus
        self._image = image or agent_image()  # one object: hydrated once, its context uploaded once
        self._app: modal.App | None = None

    async def _lookup_app(self) -> modal.App:
        if self._app is None:
            self._app = await modal.App.lookup.aio(self.app_name, create_if_missing=True)
        return self._app

    async def _sandboxes(self, **tags: str) -> builtins.list[modal.Sandbox]:
        """This installation's running sandboxes that carry at least ``tags``."""
        app = await self._lookup_app()
        wanted = {INSTALLATION_TAG: self.installation, **tags}
        return [sandbox async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id, tags=wanted)]

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Start the sandbox and return once Modal runs it and its tunnel exists (the server may
        not answer yet)."""
        return await finish_or_delete(_modal_errors(self._create(spec)), self.delete)

    async def _create(self, spec: SandboxSpec) -> Sandbox:
        app = await self._lookup_app()
        if await self._sandboxes(**{SANDBOX_TAG: spec.sandbox_id}):
            raise SandboxError(f"sandbox {spec.sandbox_id} exists already")
        volume = volume_name(self.installation, spec.volume)
        made_volume = await _create_volume(volume)
        tags = {SANDBOX_TAG: spec.sandbox_id, INSTALLATION_TAG: self.installation, VOLUME_TAG: spec.volume,
                SESSION_TAG: spec.session_id or "", TENANT_TAG: spec.tenant or "", CREATED_TAG: repr(time.time())}
        try:
            try:
                sandbox = await create_agent_sandbox(
                    app, name=spec.sandbox_id, volume=volume, token=spec.token,
                    env=spec.server_env(host="0.0.0.0", port=SERVER_PORT, data_dir=DATA_DIR), secrets=self._secrets,
                    tags=tags, timeout=self._sandbox_timeout, image=self._image, memory_bytes=self._memory_bytes,
                    cpus=self._cpus)
            except modal.exception.AlreadyExistsError:
                raise SandboxError(f"sandbox {spec.sandbox_id} exists already") from None
            try:
                address = await tunnel_url(sandbox)
            except BaseException:
                await sandbox.terminate.aio()
                raise
        except BaseException:
            if made_volume:
                with contextlib.suppress(modal.exception.Error):
                    await modal.Volume.objects.delete.aio(volume, allow_missing=True)
            raise
        return _record(tags, address)

    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        """Terminate it (Modal stops the container: SIGTERM, then SIGKILL, on its own schedule
        either way: ``at_once`` changes nothing here)."""
        await _modal_errors(self._delete(check_sandbox_id(sandbox_id)))

    async def _delete(self, sandbox_id: str) -> None:
        for sandbox in await self._sandboxes(**{SANDBOX_TAG: sandbox_id}):
            with contextlib.suppress(modal.exception.NotFoundError):  # it ended meanwhile
                await sandbox.terminate.aio()

    async def delete_volume(self, volume: str) -> None:
        name = volume_name(self.installation, volume)
        if await _modal_errors(self._sandboxes(**{VOLUME_TAG: volume})):
            raise SandboxError(f"volume {name} is in use by a sandbox")
        await _modal_errors(modal.Volume.objects.delete.aio(name, allow_missing=True))

    async def list(self) -> builtins.list[Sandbox]:
        found = []
        for sandbox in await _modal_errors(self._sandboxes()):
            try:  # one that ends between the listing and these calls is not listed
                tags = await sandbox.get_tags.aio()
                address = await tunnel_url(sandbox, timeout=5)
            except (modal.exception.Error, KeyError):
                continue
            found.append(_record(tags, address))
        return found

    async def exists(self, sandbox_id: str) -> bool:
        return bool(await _modal_errors(self._sandboxes(**{SANDBOX_TAG: check_sandbox_id(sandbox_id)})))

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        """Re-tag the sandbox with its session and tenant, so that reconciliation finds it;
        ``None`` if it is gone."""
        return await _modal_errors(self._claim(sandbox, session_id, tenant))

    async def _claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        for found in await self._sandboxes(**{SANDBOX_TAG: sandbox.sandbox_id}):
            try:
                tags = {**await found.get_tags.aio(), SESSION_TAG: session_id, TENANT_TAG: tenant}
                await found.set_tags.aio(tags)
            except (modal.exception.NotFoundError, modal.exception.ConflictError):  # it ended meanwhile
                return None
            return _record(tags, sandbox.address)
        return None

    async def run_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> CommandResult:
        """Modal kills the command a second after this stops waiting for it, so a command that
        timed out does not live on in the sandbox."""
        async with self._running(sandbox_id) as sandbox:
            process = await _modal_errors(sandbox.exec.aio(*argv, workdir=DATA_DIR, env=dict(env or {}), text=False,
                                                           timeout=math.ceil(timeout) + 1))
            try:
                return await asyncio.wait_for(_modal_errors(_output(process)), timeout)
            except TimeoutError:
                raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} did not end within {timeout:.0f} s") from None

    async def start_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """A Modal exec runs until it exits or its sandbox ends, whether anyone waits for it or not."""
        async with self._running(sandbox_id) as sandbox:
            await _modal_errors(sandbox.exec.aio(*argv, workdir=DATA_DIR, env=dict(env or {}),
                                                 stdout=modal.stream_type.StreamType.DEVNULL,
                                                 stderr=modal.stream_type.StreamType.DEVNULL))

    @contextlib.asynccontextmanager
    async def _running(self, sandbox_id: str) -> AsyncIterator[modal.Sandbox]:
        """The running sandbox of that id; its connection to the sandbox released after use."""
        found = await _modal_errors(self._sandboxes(**{SANDBOX_TAG: check_sandbox_id(sandbox_id)}))
        if not found:
            raise SandboxError(f"sandbox {sandbox_id} is not running")
        try:
            yield found[0]
        finally:
            await found[0].detach.aio()  # type: ignore[no-untyped-call]  # untyped in modal's stub


async def _create_volume(name: str) -> bool:
    """Create the volume unless it exists; whether this call created it."""
    try:
        await modal.Volume.objects.create.aio(name)
    except modal.exception.AlreadyExistsError:
        return False
    return True


async def _output(process: modal.container_process.ContainerProcess[bytes]) -> CommandResult:
    """Wait for the command: its exit code, and its stdout then its stderr (Modal streams them apart)."""
    stdout, stderr = await asyncio.gather(process.stdout.read.aio(), process.stderr.read.aio())
    return CommandResult(await process.wait.aio(), (stdout + stderr).decode(errors="replace"))


async def _modal_errors(work: Awaitable[_T]) -> _T:
    """Modal's errors (and a control plane that cannot be reached) as :class:`SandboxError`."""
    try:
        return await work
    except modal.exception.Error as exc:
        raise SandboxError(f"modal: {exc}") from exc


def _record(tags: Mapping[str, str], address: str) -> Sandbox:
    return Sandbox(tags[SANDBOX_TAG], ModalBackend.name, address, tags[VOLUME_TAG], tags[SESSION_TAG] or None,
                   tags[TENANT_TAG] or None, float(tags[CREATED_TAG]))
