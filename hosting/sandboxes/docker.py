"""Sandboxes as Docker containers of the product image (``hosting/Dockerfile``).

Each sandbox is a container ``agent-<sandbox_id>`` running ``serve`` (the image's
entrypoint is ``hosting/entrypoint.sh``) as the image's non-root user, with every
capability dropped, no new privileges, no restart policy and the configured memory
and CPU limits. Its volume is the named volume ``agent-vol-<volume>`` at ``/data``:
Docker copies the image's ``/data`` (owned by ``agent``) into an empty named volume
on first mount, so the server can write to a fresh one.

Labels are the only state (``research-agent.sandbox``, ``.installation``,
``.volume``, ``.session``, ``.tenant``, ``.created-at``, ``.port``), so any replica
can list and delete any sandbox of its installation. Labels cannot change, so
:meth:`DockerBackend.claim` records nothing on the engine. Volumes carry the
installation label too, and one installation never mounts or removes another's.

Networks:

- ``bridge`` (default): the container has its own network namespace; the server
  listens on port 8000 inside, published on 127.0.0.1 only, at a host port the
  engine chooses. The sandbox reaches the model only through what that network
  routes to (an egress proxy in production).
- ``host``: the container shares the host's network; the server listens on
  127.0.0.1 and a free port, chosen as the local backend does (a lost race is
  retried on another port), and ``create`` returns once it answers.
- any other name: a user-defined network, made beforehand (the confined tier makes it
  ``internal``, with the egress proxy as its only way out). The container joins it,
  publishes no port, and is addressed as ``http://agent-<sandbox_id>:8000`` through the
  engine's DNS on that network, so the gateway must be on it too (it runs in a container
  beside the sandboxes: ``hosting/docker/gateway-compose.yml``).

``bridge`` and ``host`` are development modes: nothing stops a sandbox's egress there.

Commands in a sandbox (:meth:`DockerBackend.run_command`, ``start_command``) are
``docker exec`` in its container, as its user, in ``/data``; they end with it.

The Docker SDK is synchronous: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from hosting.sandboxes._shared import BIND_ATTEMPTS, await_serving, finish_or_delete, free_loopback_port, tail
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
    import docker
    from docker.errors import APIError, ContainerError, DockerException, ImageNotFound, NotFound
except ImportError:
    _HAVE_SDK = False
else:
    _HAVE_SDK = True

SDK_MISSING = 'the docker backend needs the Docker SDK: pip install "research-agent-hosting[docker]"'
DATA_DIR = "/data"

SANDBOX_LABEL = "research-agent.sandbox"
INSTALLATION_LABEL = "research-agent.installation"
VOLUME_LABEL = "research-agent.volume"
SESSION_LABEL = "research-agent.session"
TENANT_LABEL = "research-agent.tenant"
CREATED_LABEL = "research-agent.created-at"
PORT_LABEL = "research-agent.port"
"""The port the server listens on in its network namespace (the host's, with ``host``)."""

_T = TypeVar("_T")


def container_name(sandbox_id: str) -> str:
    return f"agent-{check_sandbox_id(sandbox_id)}"


def volume_name(volume: str) -> str:
    return f"agent-vol-{check_volume(volume)}"


class DockerBackend(SandboxBackend):
    """Containers on one Docker engine (see the module doc)."""

    name = "docker"

    def __init__(self, image: str, installation: str = "default", network: str = "bridge",
                 memory_bytes: int | None = None, nano_cpus: int | None = None, client: Any = None, *,
                 start_timeout: float = 90.0, stop_timeout: int = 5) -> None:
        """``client`` is a ``docker.DockerClient`` (default: from the environment, closed
        by :meth:`aclose`). Raises :class:`SandboxError` without the SDK or the engine."""
        if not _HAVE_SDK:
            raise SandboxError(SDK_MISSING)
        if not network or network == "none" or ":" in network:
            raise ValueError(f"network must be 'host', 'bridge' or a user-defined network's name, not {network!r}")
        try:
            self._client = client if client is not None else docker.from_env()
        except DockerException as exc:
            raise SandboxError(f"cannot reach the Docker engine: {exc}") from exc
        self._owns_client = client is None
        self.image = image
        self.installation = installation
        self.network = network
        self._memory_bytes = memory_bytes
        self._nano_cpus = nano_cpus
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        """One blocking SDK call in a worker thread; engine errors, and an engine that
        cannot be reached (``requests``' errors are ``OSError``), become :class:`SandboxError`."""
        try:
            return await asyncio.to_thread(function, *args)
        except (DockerException, OSError) as exc:
            raise SandboxError(f"docker: {exc}") from exc

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Start the container; with ``host`` networking, return once its server answers."""
        return await finish_or_delete(self._create(spec), self.delete)

    async def _create(self, spec: SandboxSpec) -> Sandbox:
        name = container_name(spec.sandbox_id)
        await self._call(self._check_image)
        if self.network not in ("host", "bridge"):
            await self._call(self._check_network)
        if await self._call(self._named, name):  # before the cleanup below could remove it
            raise SandboxError(f"sandbox {spec.sandbox_id} exists already")
        made_volume = await self._call(self._ensure_volume, spec.volume)
        try:
            for _ in range(BIND_ATTEMPTS if self.network == "host" else 1):
                sandbox = await self._start(spec)
                if sandbox is not None:
                    return sandbox
                await self._call(self._remove, name)
            raise SandboxError(f"sandbox {spec.sandbox_id}: its port was taken {BIND_ATTEMPTS} times")
        except BaseException:
            with contextlib.suppress(SandboxError):
                await self._call(self._remove, name)
                if made_volume:
                    await self._call(self._delete_volume, spec.volume)
            raise

    async def _start(self, spec: SandboxSpec) -> Sandbox | None:
        """One container; ``None`` if its host-network port was taken."""
        port = free_loopback_port() if self.network == "host" else SERVER_PORT
        host = "127.0.0.1" if self.network == "host" else "0.0.0.0"
        attrs = await self._call(self._run, spec, spec.server_env(host=host, port=port, data_dir=DATA_DIR), port)
        sandbox = _sandbox(attrs["Config"]["Labels"], attrs["HostConfig"]["NetworkMode"],
                           _published(attrs["NetworkSettings"]["Ports"] or {}))
        if self.network != "host":
            return sandbox

        async def exited() -> str | None:
            return await self._call(self._output_if_exited, container_name(spec.sandbox_id))

        serving = await await_serving(spec.sandbox_id, sandbox.address, spec.token, exited, self._start_timeout)
        return sandbox if serving else None

    def _check_image(self) -> None:
        try:
            config = self._client.api.inspect_image(self.image)["Config"]
        except ImageNotFound:
            raise SandboxError(f"image {self.image!r} is not on the Docker engine: build hosting/Dockerfile") from None
        if (config.get("User") or "root").split(":")[0] in ("root", "0"):
            raise SandboxError(f"image {self.image!r} runs as root: a sandbox runs as the image's non-root user")

    def _check_network(self) -> None:
        try:
            self._client.api.inspect_network(self.network)
        except NotFound:
            raise SandboxError(f"docker network {self.network!r} does not exist: create it, or start "
                               "hosting/docker/gateway-compose.yml, which does") from None

    def _named(self, name: str) -> bool:
        """Whether a container of that name exists, in any state or installation."""
        try:
            self._client.api.inspect_container(name)
        except NotFound:
            return False
        return True

    def _ensure_volume(self, volume: str) -> bool:
        """Create the named volume unless it exists; whether this call created it."""
        name = volume_name(volume)
        try:
            labels = self._client.api.inspect_volume(name).get("Labels") or {}
        except NotFound:
            self._client.api.create_volume(name, labels={INSTALLATION_LABEL: self.installation, VOLUME_LABEL: volume})
            return True
        if labels.get(INSTALLATION_LABEL) != self.installation:
            raise SandboxError(f"volume {name} belongs to another installation")
        return False

    def _run(self, spec: SandboxSpec, env: dict[str, str], port: int) -> dict[str, Any]:
        """Create and start the container; its inspected state. Nothing is left if it does not start."""
        labels = {
            SANDBOX_LABEL: spec.sandbox_id, INSTALLATION_LABEL: self.installation, VOLUME_LABEL: spec.volume,
            SESSION_LABEL: spec.session_id or "", TENANT_LABEL: spec.tenant or "",
            CREATED_LABEL: repr(time.time()), PORT_LABEL: str(port),
        }
        network: dict[str, Any] = (
            {"network_mode": "host"} if self.network == "host"
            else {"ports": {f"{SERVER_PORT}/tcp": ("127.0.0.1",)}} if self.network == "bridge"
            else {"network": self.network}  # no port published: reached by name on that network
        )
        try:
            container = self._client.containers.create(
                self.image, ["serve"], name=container_name(spec.sandbox_id), labels=labels, environment=env,
                volumes={volume_name(spec.volume): {"bind": DATA_DIR, "mode": "rw"}},
                mem_limit=self._memory_bytes, nano_cpus=self._nano_cpus, restart_policy={"Name": "no"},
                cap_drop=["ALL"], security_opt=["no-new-privileges"], **network)
        except APIError as exc:
            if exc.status_code == 409:  # made since the check by a create of the same id (ids are unique)
                raise SandboxError(f"sandbox {spec.sandbox_id} exists already") from None
            raise
        try:
            container.start()
            container.reload()
        except BaseException:
            container.remove(force=True)
            raise
        attrs: dict[str, Any] = container.attrs
        if attrs["State"]["Status"] != "running":
            output = container.logs().decode(errors="replace")
            container.remove(force=True)
            raise SandboxError(f"sandbox {spec.sandbox_id} exited at once:\n{tail(output)}")
        if self.network not in ("host", "bridge"):
            try:
                self._drop_default_route(container.id)
            except BaseException:
                container.remove(force=True)
                raise
        return attrs

    def _drop_default_route(self, container_id: str) -> None:
        """Remove the sandbox's default route before it serves anything (see
        :mod:`hosting.sandboxes.no_default_route`): a short-lived container of the same image
        in the sandbox's network namespace, root with ``CAP_NET_ADMIN`` only. A sandbox that
        keeps a route out is not handed out."""
        try:
            self._client.containers.run(
                self.image, entrypoint=["python3", "-m", "hosting.sandboxes.no_default_route"],
                network_mode=f"container:{container_id}", user="0", cap_drop=["ALL"], cap_add=["NET_ADMIN"],
                security_opt=["no-new-privileges"], remove=True)
        except ContainerError as exc:
            output = (exc.stderr or b"").decode(errors="replace")
            raise SandboxError(f"the sandbox's default route could not be removed: {tail(output)}") from None

    def _output_if_exited(self, name: str) -> str | None:
        try:
            state = self._client.api.inspect_container(name)["State"]["Status"]
        except NotFound:
            return "the container was removed"
        if state in ("created", "running"):
            return None
        output: bytes = self._client.api.logs(name)
        return output.decode(errors="replace")

    def _remove(self, name: str) -> None:
        try:
            self._client.api.remove_container(name, force=True)
        except NotFound:
            pass

    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        """``docker stop`` (SIGTERM: the server drains, SIGKILL after ``stop_timeout``, or at once), then remove."""
        await self._call(self._delete, container_name(sandbox_id), 0 if at_once else self._stop_timeout)

    def _delete(self, name: str, stop_timeout: int) -> None:
        try:
            labels = self._client.api.inspect_container(name)["Config"]["Labels"] or {}
            if labels.get(INSTALLATION_LABEL) != self.installation:
                return
            self._client.api.stop(name, timeout=stop_timeout)
            self._client.api.remove_container(name, force=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: another replica is removing it
                raise

    async def run_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> CommandResult:
        try:
            return await asyncio.wait_for(
                self._call(self._exec, container_name(sandbox_id), list(argv), dict(env or {}), False), timeout)
        except TimeoutError:
            raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} did not end within {timeout:.0f} s") from None

    async def start_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        await self._call(self._exec, container_name(sandbox_id), list(argv), dict(env or {}), True)

    def _exec(self, name: str, argv: list[str], env: dict[str, str], detach: bool) -> CommandResult:
        try:
            labels = self._client.api.inspect_container(name)["Config"]["Labels"] or {}
            if labels.get(INSTALLATION_LABEL) != self.installation:
                raise SandboxError(f"container {name} belongs to another installation")
            exec_id = self._client.api.exec_create(name, argv, environment=env, workdir=DATA_DIR)["Id"]
            output: bytes = self._client.api.exec_start(exec_id, detach=detach) or b""
        except NotFound:
            raise SandboxError(f"sandbox container {name} does not exist") from None
        except APIError as exc:
            if exc.status_code == 409:  # not running
                raise SandboxError(f"sandbox container {name} is not running") from None
            raise
        if detach:
            return CommandResult(0, "")
        exit_code = self._client.api.exec_inspect(exec_id)["ExitCode"]
        return CommandResult(exit_code if exit_code is not None else -1, output.decode(errors="replace"))

    async def delete_volume(self, volume: str) -> None:
        await self._call(self._delete_volume, volume)

    def _delete_volume(self, volume: str) -> None:
        name = volume_name(volume)
        try:
            labels = self._client.api.inspect_volume(name).get("Labels") or {}
            if labels.get(INSTALLATION_LABEL) != self.installation:
                raise SandboxError(f"volume {name} belongs to another installation")
            self._client.api.remove_volume(name)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code == 409:
                raise SandboxError(f"volume {name} is in use: {exc.explanation}") from None
            raise

    async def list(self) -> list[Sandbox]:
        return await self._call(self._list)

    def _list(self) -> builtins.list[Sandbox]:
        containers = self._client.api.containers(all=True, filters={
            "label": [f"{INSTALLATION_LABEL}={self.installation}"], "status": ["created", "running"]})
        return [_sandbox(c["Labels"], c["HostConfig"]["NetworkMode"],
                         {p["PrivatePort"]: p["PublicPort"] for p in c["Ports"] if "PublicPort" in p})
                for c in containers]

    async def exists(self, sandbox_id: str) -> bool:
        return await self._call(self._exists, container_name(sandbox_id))

    def _exists(self, name: str) -> bool:
        try:
            attrs = self._client.api.inspect_container(name)
        except NotFound:
            return False
        labels = attrs["Config"]["Labels"] or {}
        return labels.get(INSTALLATION_LABEL) == self.installation and attrs["State"]["Status"] in ("created", "running")

    async def remove_installation(self) -> None:
        """Remove every container and volume of this installation, conversations included:
        the teardown of a whole deployment (and of a test's)."""
        await self._call(self._remove_installation)

    def _remove_installation(self) -> None:
        label = f"{INSTALLATION_LABEL}={self.installation}"
        for container in self._client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
        for volume in self._client.volumes.list(filters={"label": label}):
            volume.remove(force=True)

    async def aclose(self) -> None:
        await super().aclose()
        if self._owns_client:
            await asyncio.to_thread(self._client.close)


def _published(ports: dict[str, Any]) -> dict[int, int]:
    """``{container port: host port}`` from an inspected container's ``NetworkSettings.Ports``."""
    return {int(key.split("/")[0]): int(bindings[0]["HostPort"]) for key, bindings in ports.items() if bindings}


def _sandbox(labels: dict[str, str], network_mode: str, published: dict[int, int]) -> Sandbox:
    """The sandbox a container's labels describe. A bridge container that is created
    but not started has no host port yet: its address is empty until it runs. On a
    user-defined network it is its container's name, which the engine's DNS resolves there."""
    if network_mode == "host":
        address = f"http://127.0.0.1:{labels[PORT_LABEL]}"
    elif network_mode in ("bridge", "default"):
        address = f"http://127.0.0.1:{published[SERVER_PORT]}" if SERVER_PORT in published else ""
    else:
        address = f"http://{container_name(labels[SANDBOX_LABEL])}:{labels[PORT_LABEL]}"
    return Sandbox(labels[SANDBOX_LABEL], DockerBackend.name, address, labels[VOLUME_LABEL],
                   labels[SESSION_LABEL] or None, labels[TENANT_LABEL] or None, float(labels[CREATED_LABEL]))
