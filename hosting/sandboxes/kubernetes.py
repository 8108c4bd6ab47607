"""Sandboxes as Kubernetes pods, one per session, all made from one pod template.

The template is a manifest file (``hosting/kubernetes/base/agent-pod-template.yaml``,
mounted into the gateway from a ConfigMap), so what the cluster runs is what the
manifests say: image, non-root user, read-only root, probes, limits. The backend adds
only what differs per sandbox:

- the name ``agent-<sandbox_id>`` (sandbox ids are DNS labels already);
- labels ``research-agent/installation``, ``research-agent/sandbox`` and
  ``research-agent/session``, the last a hash of the session id ("" while the pod
  waits in the warm pool): session ids may hold upper case and ``_`` and be 64
  characters long, which no label value may, so ids and tenants live in annotations
  (``research-agent/session-id``, ``/tenant``, ``/volume``, ``/created-at``);
- the spec's server environment, over the template's (so the gateway's settings win),
  with the per-sandbox bearer token as ``AGENT_AUTH_TOKEN``. The token sits in the pod's
  spec, which only the gateway's Role may read; sandboxes get no service-account token;
- that token again as the readiness probe's ``Authorization`` header: ``/ready`` is
  authenticated and the kubelet cannot expand variables in probe headers.

So every pod spec carries the environment the gateway passes on: in a cluster, give the
gateway the egress proxy's address and a placeholder key, never the real model key.

Every method works from the API alone, so any replica can list, claim and delete any
sandbox of its installation. A pod is handed out only once its ``Ready`` condition is
true: :meth:`KubernetesBackend.create` waits for it, and :meth:`KubernetesBackend.claim`
checks it, then takes the pod with a JSON Patch whose ``test`` op fails (422) if another
replica took it first. The server is reached at the pod's IP and the container port the
template names ``http``.

Volumes: ``/data`` is an ``emptyDir`` that goes with its pod. A conversation outlives
its pod through the server's SessionStore (``AGENT_SESSION_STORE``), keyed by session
id, so a volume here is only a name on the pod (see :meth:`KubernetesBackend.delete_volume`).

Commands in a sandbox (:meth:`KubernetesBackend.run_command`, ``start_command``) go
through the pods ``exec`` subresource, over the client library's WebSocket support, into
the server container, as the pod's user. The exec request names only
``python3 -m hosting.sandboxes.launch``; the real argv and env travel on its stdin (see
:mod:`hosting.sandboxes.launch`), because API servers write exec URLs to their audit
logs and env may hold a secret. They end with the pod.

API calls used (the gateway Role must grant exactly these): pods ``create``, ``get``,
``list``, ``patch``, ``delete``; for commands also ``pods/exec`` ``get`` and ``create``
(a WebSocket exec is authorised as ``get``, and from Kubernetes 1.35 as ``create`` too).
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import hashlib
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from hosting.sandboxes import launch
from hosting.sandboxes._shared import finish_or_delete
from hosting.sandboxes.base import (
    CommandResult,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
    check_sandbox_id,
    check_volume,
)

try:
    import aiohttp
    from kubernetes.aio.client import ApiClient, Configuration, CoreV1Api, V1DeleteOptions, V1Pod
    from kubernetes.aio.client.exceptions import ApiException
    from kubernetes.aio.config import load_incluster_config, load_kube_config
    from kubernetes.aio.config.config_exception import ConfigException
    from kubernetes.aio.stream import WsApiClient
    from kubernetes.aio.stream.ws_client import ERROR_CHANNEL, STDERR_CHANNEL, STDIN_CHANNEL, STDOUT_CHANNEL
except ImportError:
    _HAVE_CLIENT = False
else:
    _HAVE_CLIENT = True

CLIENT_MISSING = 'the kubernetes backend needs the Kubernetes client: pip install "research-agent-hosting[kubernetes]"'
DEFAULT_POD_TEMPLATE = Path("/etc/agent-gateway/agent-pod-template.yaml")
SERVER_CONTAINER = "server"
"""The template's container that runs the server; its port named ``http`` is the server's."""
DATA_DIR = "/data"

INSTALLATION_LABEL = "research-agent/installation"
SANDBOX_LABEL = "research-agent/sandbox"
SESSION_LABEL = "research-agent/session"
SESSION_ANNOTATION = "research-agent/session-id"
TENANT_ANNOTATION = "research-agent/tenant"
VOLUME_ANNOTATION = "research-agent/volume"
CREATED_ANNOTATION = "research-agent/created-at"

CANNOT_START = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                          "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                          "CrashLoopBackOff"})
"""Reasons a container waits for ever: a create that sees one gives up at once."""

COMMAND_START_TIMEOUT = 30.0
"""How long :meth:`KubernetesBackend.start_command` waits for the launcher to start a command."""

_T = TypeVar("_T")


def pod_name(sandbox_id: str) -> str:
    return f"agent-{check_sandbox_id(sandbox_id)}"


def session_label(session_id: str | None) -> str:
    """A label value for any legal session id: 32 hex characters of its SHA-256 ("" for none)."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32] if session_id else ""


def _pointer(key: str) -> str:
    """``key`` as one JSON Pointer token (RFC 6901): label keys hold ``/``."""
    return key.replace("~", "~0").replace("/", "~1")


def load_pod_template(path: Path) -> dict[str, Any]:
    """The pod template at ``path``, checked for what the backend relies on."""
    try:
        template = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SandboxError(f"cannot read the pod template {path}: {exc}") from exc
    if not isinstance(template, dict) or template.get("kind") != "Pod" or template.get("apiVersion") != "v1":
        raise SandboxError(f"the pod template {path} must be one v1 Pod")
    try:
        _server_port(template)
    except (KeyError, TypeError, StopIteration):
        raise SandboxError(f"the pod template {path} needs a container {SERVER_CONTAINER!r} "
                           "with a port named 'http'") from None
    return template


def _server_container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = next(c for c in pod["spec"]["containers"] if c["name"] == SERVER_CONTAINER)
    return container


def _server_port(pod: dict[str, Any]) -> int:
    port: int = next(p["containerPort"] for p in _server_container(pod)["ports"] if p.get("name") == "http")
    return port


class KubernetesBackend(SandboxBackend):
    """Pods in one namespace (see the module doc)."""

    name = "kubernetes"

    def __init__(self, pod_template: Path = DEFAULT_POD_TEMPLATE, namespace: str = "default",
                 installation: str = "default", *, kubeconfig: Path | None = None, api_client: ApiClient | None = None,
                 image: str | None = None, start_timeout: float = 120.0, stop_timeout: int = 5) -> None:
        """``api_client`` is a ``kubernetes.aio.client.ApiClient`` (then not closed here);
        without one, the client uses ``kubeconfig``, or the pod's service account when
        that is ``None``. ``image`` replaces the template's. Raises :class:`SandboxError`
        without the client, a usable template, or a kubeconfig file or cluster to use."""
        if not _HAVE_CLIENT:
            raise SandboxError(CLIENT_MISSING)
        self._template = load_pod_template(pod_template)
        if image is not None:
            _server_container(self._template)["image"] = image
        self.namespace = namespace
        self.installation = installation
        self._kubeconfig = kubeconfig
        self._configuration: Configuration | None = None
        if api_client is None and kubeconfig is None:
            self._configuration = Configuration()
            try:
                load_incluster_config(client_configuration=self._configuration)  # type: ignore[no-untyped-call]
            except ConfigException as exc:
                raise SandboxError(f"kubernetes: no kubeconfig given and not in a cluster: {exc}") from None
        elif kubeconfig is not None and not kubeconfig.is_file():
            raise SandboxError(f"kubernetes: no kubeconfig file at {kubeconfig}")
        self._client: ApiClient | None = api_client
        self._owns_client = api_client is None
        self._api: CoreV1Api | None = None
        self._ws_client: WsApiClient | None = None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout

    async def _core(self) -> CoreV1Api:
        """The ``CoreV1Api``, made on first use: loading a kubeconfig is a coroutine."""
        if self._api is None:
            if self._client is None:
                configuration = self._configuration or await self._load_kubeconfig()
                self._client = ApiClient(configuration)
            self._api = CoreV1Api(self._client)
        return self._api

    async def _load_kubeconfig(self) -> Configuration:
        configuration = Configuration()
        try:
            await load_kube_config(config_file=str(self._kubeconfig),  # type: ignore[no-untyped-call]
                                   client_configuration=configuration)
        except (ConfigException, OSError, ValueError) as exc:
            raise SandboxError(f"kubernetes: cannot use the kubeconfig {self._kubeconfig}: {exc}") from None
        return configuration

    async def _call(self, call: Callable[[CoreV1Api], Awaitable[_T]], *, missing: _T | None = None,
                    allow: tuple[int, ...] = ()) -> _T | None:
        """One API call; ``missing`` for a 404, ``None`` for a status in ``allow``, and
        :class:`SandboxError` for any other failure. The error says the status and the
        API's reason only: a response body may quote the pod's spec, tokens included."""
        api = await self._core()
        try:
            return await call(api)
        except ApiException as exc:
            if exc.status == 404:
                return missing
            if exc.status in allow:
                return None
            raise SandboxError(f"kubernetes: {exc.status} {exc.reason}") from None
        except OSError as exc:  # aiohttp's connection errors are OSErrors
            raise SandboxError(f"kubernetes: cannot reach the API server: {exc}") from None
        except ValueError as exc:  # pydantic's ValidationError: not a pod as the API describes one
            raise SandboxError(f"kubernetes: unexpected answer from the API server: {exc}") from None

    async def _read(self, sandbox_id: str) -> V1Pod | None:
        """This installation's pod of ``sandbox_id``, or ``None``."""
        name = pod_name(sandbox_id)
        pod = await self._call(lambda api: api.read_namespaced_pod(name, self.namespace))
        if pod is None or _labels(pod).get(INSTALLATION_LABEL) != self.installation:
            return None
        return pod

    def manifest(self, spec: SandboxSpec) -> dict[str, Any]:
        """The pod of ``spec``: the template plus what the module doc lists."""
        pod = copy.deepcopy(self._template)
        metadata = pod.setdefault("metadata", {})
        metadata.pop("generateName", None)
        metadata["name"] = pod_name(spec.sandbox_id)
        metadata["namespace"] = self.namespace
        metadata["labels"] = {**(metadata.get("labels") or {}), INSTALLATION_LABEL: self.installation,
                              SANDBOX_LABEL: spec.sandbox_id, SESSION_LABEL: session_label(spec.session_id)}
        metadata["annotations"] = {**(metadata.get("annotations") or {}), SESSION_ANNOTATION: spec.session_id or "",
                                   TENANT_ANNOTATION: spec.tenant or "", VOLUME_ANNOTATION: spec.volume,
                                   CREATED_ANNOTATION: repr(time.time())}
        container = _server_container(pod)
        env = spec.server_env(host="0.0.0.0", port=_server_port(pod), data_dir=DATA_DIR)
        container["env"] = [e for e in container.get("env") or [] if e["name"] not in env]
        container["env"] += [{"name": name, "value": value} for name, value in env.items()]
        probe = container.get("readinessProbe", {}).get("httpGet")
        if probe is not None:
            probe["httpHeaders"] = [h for h in probe.get("httpHeaders") or [] if h["name"].lower() != "authorization"]
            probe["httpHeaders"].append({"name": "Authorization", "value": f"Bearer {spec.token}"})
        return pod

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create the pod and return once its ``Ready`` condition is true. A pod that
        cannot start (its image cannot be pulled, its server exits, it is not ready within
        ``start_timeout``) is deleted and :class:`SandboxError` says why."""
        return await finish_or_delete(self._create(spec), self.delete)

    async def _create(self, spec: SandboxSpec) -> Sandbox:
        body = cast(V1Pod, V1Pod.from_dict(self.manifest(spec)))  # None only for a None dict
        created = await self._call(lambda api: api.create_namespaced_pod(self.namespace, body), allow=(409,))
        if created is None:
            raise SandboxError(f"sandbox {spec.sandbox_id} exists already")
        try:
            return await self._until_ready(spec.sandbox_id)
        except BaseException:
            await self._remove(spec.sandbox_id, grace_seconds=0)
            raise

    async def _until_ready(self, sandbox_id: str) -> Sandbox:
        deadline = time.monotonic() + self._start_timeout
        delay = 0.05
        while True:
            pod = await self._read(sandbox_id)
            if pod is None:
                raise SandboxError(f"sandbox {sandbox_id}: its pod was deleted while it started")
            if _is_ready(pod):
                return self._sandbox(pod)
            failure = _failure(pod)
            if failure is not None:
                raise SandboxError(f"sandbox {sandbox_id} cannot start: {failure}")
            if time.monotonic() + delay > deadline:
                raise SandboxError(f"sandbox {sandbox_id}: its pod was not ready within {self._start_timeout:.0f} s "
                                   f"(phase {pod.status.phase if pod.status else None})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def delete(self, sandbox_id: str) -> None:
        """Delete the pod (SIGTERM: the server drains; SIGKILL after ``stop_timeout``) and
        wait until it is gone, so nothing of it runs once this returns."""
        if await self._read(sandbox_id) is not None:
            await self._remove(sandbox_id, self._stop_timeout)

    async def _remove(self, sandbox_id: str, grace_seconds: int) -> None:
        name = pod_name(sandbox_id)
        options = V1DeleteOptions(grace_period_seconds=grace_seconds)
        await self._call(lambda api: api.delete_namespaced_pod(name, self.namespace, body=options))
        deadline = time.monotonic() + grace_seconds + 30
        while await self._call(lambda api: api.read_namespaced_pod(name, self.namespace)) is not None:
            if time.monotonic() > deadline:
                raise SandboxError(f"sandbox {sandbox_id}: its pod is still terminating after {grace_seconds + 30} s")
            await asyncio.sleep(0.1)

    async def delete_volume(self, volume: str) -> None:
        """Nothing to remove: ``/data`` is an ``emptyDir`` that went with its pod, and the
        conversation is in the SessionStore, which the server clears on ``DELETE
        /sessions/{id}``. A volume still named by a live pod raises :class:`SandboxError`,
        as on every backend."""
        check_volume(volume)
        users = [s.sandbox_id for s in await self.list() if s.volume == volume]
        if users:
            raise SandboxError(f"volume {volume} is in use by sandbox {', '.join(users)}")

    async def list(self) -> list[Sandbox]:
        """This installation's pods that are starting or running (not terminating); one
        without an IP yet has an empty address."""
        return [self._sandbox(pod) for pod in await self._pods() if _is_live(pod)]

    async def _pods(self) -> builtins.list[V1Pod]:
        selector = f"{INSTALLATION_LABEL}={self.installation}"
        listed = await self._call(lambda api: api.list_namespaced_pod(self.namespace, label_selector=selector))
        return list(listed.items) if listed is not None else []

    async def exists(self, sandbox_id: str) -> bool:
        pod = await self._read(sandbox_id)
        return pod is not None and _is_live(pod)

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        """Label the pod with the session, only if it is ready and still unclaimed: the
        patch's ``test`` ops make the API refuse it (422) if another replica came first."""
        pod = await self._read(sandbox.sandbox_id)
        if pod is None or not _is_live(pod) or not _is_ready(pod):
            return None
        labels, annotations = "/metadata/labels/", "/metadata/annotations/"
        patch = [
            {"op": "test", "path": labels + _pointer(INSTALLATION_LABEL), "value": self.installation},
            {"op": "test", "path": labels + _pointer(SESSION_LABEL), "value": ""},
            {"op": "replace", "path": labels + _pointer(SESSION_LABEL), "value": session_label(session_id)},
            {"op": "replace", "path": annotations + _pointer(SESSION_ANNOTATION), "value": session_id},
            {"op": "replace", "path": annotations + _pointer(TENANT_ANNOTATION), "value": tenant},
        ]
        name = pod_name(sandbox.sandbox_id)
        patched = await self._call(lambda api: api.patch_namespaced_pod(name, self.namespace, patch), allow=(422,))
        return self._sandbox(patched) if patched is not None else None

    async def run_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> CommandResult:
        """On timeout the exec stream is closed, so the launcher's stdin closes and it kills the command."""
        request = launch.encode_request(argv, env, detach=False)
        try:
            exit_code, output = await asyncio.wait_for(self._exec(sandbox_id, request), timeout)
        except TimeoutError:
            raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} did not end within {timeout:.0f} s") from None
        if exit_code == launch.CANNOT_START and output.startswith(launch.FAILED):
            raise SandboxError(f"sandbox {sandbox_id}: {output.removeprefix(launch.FAILED).strip()}")
        return CommandResult(exit_code, output)

    async def start_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Returns once the launcher has started the command in a session of its own and exited."""
        request = launch.encode_request(argv, env, detach=True)
        try:
            exit_code, output = await asyncio.wait_for(self._exec(sandbox_id, request), COMMAND_START_TIMEOUT)
        except TimeoutError:
            raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} did not start within {COMMAND_START_TIMEOUT:.0f} s") \
                from None
        if exit_code != 0:
            raise SandboxError(f"sandbox {sandbox_id}: {output.removeprefix(launch.FAILED).strip()}")

    async def _exec(self, sandbox_id: str, request: bytes) -> tuple[int, str]:
        """Run the launcher in the sandbox's server container with ``request`` on its stdin;
        its exit status (from the error channel's ``Status``) and its output."""
        pod = await self._read(sandbox_id)
        if pod is None or not _is_live(pod) or pod.status is None or pod.status.phase != "Running":
            raise SandboxError(f"sandbox {sandbox_id} is not running")
        api = CoreV1Api(await self._streams())
        output = bytearray()
        ended: bytes | None = None
        try:
            # the generated signature says ClientResponse; WsApiClient hands back aiohttp's ws_connect
            connecting = cast(AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse],
                              await api.connect_get_namespaced_pod_exec_without_preload_content(
                                  pod_name(sandbox_id), self.namespace, command=list(launch.COMMAND),
                                  container=SERVER_CONTAINER, stdin=True, stdout=True, stderr=True, tty=False))
            async with connecting as stream:
                await stream.send_bytes(bytes([STDIN_CHANNEL]) + request)
                async for message in stream:
                    if message.type is not aiohttp.WSMsgType.BINARY or not message.data:
                        continue
                    channel, data = message.data[0], message.data[1:]
                    if channel in (STDOUT_CHANNEL, STDERR_CHANNEL):
                        output += data
                    elif channel == ERROR_CHANNEL:
                        ended = data
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (400, 404):  # gone, or not running (any more)
                raise SandboxError(f"sandbox {sandbox_id} is not running: {exc.status} {exc.message}") from None
            raise SandboxError(f"kubernetes: exec: {exc.status} {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SandboxError(f"kubernetes: exec: cannot reach the API server: {exc}") from None
        return _exit_code(sandbox_id, ended), output.decode(errors="replace")

    async def _streams(self) -> WsApiClient:
        """The client for exec streams, made on first use with the API client's configuration."""
        if self._ws_client is None:
            await self._core()
            assert self._client is not None
            self._ws_client = WsApiClient(self._client.configuration)  # type: ignore[no-untyped-call]
        return self._ws_client

    def _sandbox(self, pod: V1Pod) -> Sandbox:
        annotations = pod.metadata.annotations if pod.metadata and pod.metadata.annotations else {}
        ip = pod.status.pod_ip if pod.status else None
        host = f"[{ip}]" if ip and ipaddress.ip_address(ip).version == 6 else ip
        containers = pod.spec.containers if pod.spec else []
        port = next(p.container_port for c in containers if c.name == SERVER_CONTAINER for p in c.ports or []
                    if p.name == "http")
        return Sandbox(_labels(pod)[SANDBOX_LABEL], self.name, f"http://{host}:{port}" if host else "",
                       annotations.get(VOLUME_ANNOTATION, ""), annotations.get(SESSION_ANNOTATION) or None,
                       annotations.get(TENANT_ANNOTATION) or None, float(annotations.get(CREATED_ANNOTATION, "0")))

    async def aclose(self) -> None:
        await super().aclose()
        if self._ws_client is not None:
            await self._ws_client.close()  # type: ignore[no-untyped-call]
            self._ws_client = None
        if self._owns_client and self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]
            self._client = None
            self._api = None


def _labels(pod: V1Pod) -> dict[str, str]:
    return pod.metadata.labels if pod.metadata and pod.metadata.labels else {}


def _is_live(pod: V1Pod) -> bool:
    """Starting or running, and not being deleted."""
    deleting = pod.metadata is None or pod.metadata.deletion_timestamp is not None
    return not deleting and pod.status is not None and pod.status.phase in ("Pending", "Running")


def _is_ready(pod: V1Pod) -> bool:
    conditions = pod.status.conditions if pod.status else None
    return any(c.type == "Ready" and c.status == "True" for c in conditions or [])


def _exit_code(sandbox_id: str, ended: bytes | None) -> int:
    """The exit status in the error channel's ``Status``, read as the client library's
    ``parse_error_data`` reads it; :class:`SandboxError` if the stream ended without one, or
    with a failure that is no exit status (the runtime could not start the launcher)."""
    if ended is None:
        raise SandboxError(f"sandbox {sandbox_id}: the exec stream ended without an exit status")
    try:
        code: int = WsApiClient.parse_error_data(ended)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, IndexError, TypeError):
        try:
            why = json.loads(ended).get("message")
        except (ValueError, AttributeError):
            why = None
        raise SandboxError(f"sandbox {sandbox_id}: the command could not start: {why or 'no reason given'}") from None
    return code


def _failure(pod: V1Pod) -> str | None:
    """Why the pod will never be ready, or ``None`` while it still may be."""
    status = pod.status
    if status is None:
        return None
    for container in status.container_statuses or []:
        state = container.state
        if state is not None and state.waiting is not None and state.waiting.reason in CANNOT_START:
            return f"{state.waiting.reason}: {state.waiting.message or ''}".rstrip(": ")
        if state is not None and state.terminated is not None:
            ended = state.terminated
            return f"its server exited with status {ended.exit_code} ({ended.reason or 'no reason'})"
    if status.phase in ("Failed", "Succeeded"):
        return f"the pod {status.phase.lower()}: {status.reason or ''} {status.message or ''}".strip()
    return None
