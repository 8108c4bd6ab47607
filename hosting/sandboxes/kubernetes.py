"""Sandboxes as Kubernetes pods, one per session, all made from one pod template.

The template is a manifest file (``hosting/kubernetes/base/agent-pod-template.yaml``,
mounted into the gateway from a ConfigMap), so what the cluster runs is what the
manifests say: image, non-root user, read-only root, probes, limits. The backend adds
only what differs per sandbox:

- the name ``agent-<sandbox_id>`` (sandbox ids are DNS labels already);
- labels ``research-agent/installation``, ``research-agent/sandbox`` and
  ``research-agent/session``, the last a hash of the tenant and the session id ("" while
  the pod waits in the warm pool; :func:`session_label`): session ids are per tenant
  (alice's ``trip-1`` and bob's ``trip-1`` are two sessions), and may hold upper case and
  ``_`` and be 64 characters long, which no label value may, so ids and tenants live in
  annotations (``research-agent/session-id``, ``/tenant``, ``/volume``, ``/created-at``);
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

Volumes, in one of two modes (``volumes``; the gateway's ``GATEWAY_KUBERNETES_VOLUMES``):

- ``emptydir`` (the default): ``/data`` is the template's ``emptyDir``, which goes with its
  pod. A conversation outlives its pod only through the server's SessionStore
  (``AGENT_SESSION_STORE``), keyed by session id, so a volume is only a name on the pod.
- ``pvc``: each volume is a PersistentVolumeClaim, ``agent-data-`` and a hash of the
  installation and the volume name (:func:`claim_name`; volume names may hold upper case,
  ``_`` and ``.``, and installations may share a namespace), labelled
  ``research-agent/installation`` and ``research-agent/volume`` (:func:`volume_label`) and
  annotated with the volume name. :meth:`KubernetesBackend.create` makes it if it is
  missing (``ReadWriteOnce``, ``volume_size``, ``storage_class`` or the cluster's default)
  and mounts it at ``/data`` in place of the template's volume there, so the pod that
  replaces a lost one (same volume: the gateway keeps it in the session's route) finds the
  conversation where the last one left it; a warm-pool pod gets one for its own volume,
  which becomes the session's when the pod is claimed. A create that fails removes a
  claim it made; :meth:`KubernetesBackend.delete_volume` removes the claim once no pod
  of the installation runs on it. A claim of another installation is never mounted nor
  removed.

Commands in a sandbox (:meth:`KubernetesBackend.run_command`, ``start_command``) go
through the pods ``exec`` subresource, over the client library's WebSocket support, into
the server container, as the pod's user. The exec request names only
``python3 -m hosting.sandboxes.launch``; the real argv and env travel on its stdin (see
:mod:`hosting.sandboxes.launch`), because API servers write exec URLs to their audit
logs and env may hold a secret. They end with the pod.

API calls used (the gateway Role must grant exactly these): pods ``create``, ``get``,
``list``, ``patch``, ``delete``; in ``pvc`` mode also persistentvolumeclaims ``create``,
``get`` and ``delete``; for commands also ``pods/exec`` ``get`` and ``create`` (a WebSocket
exec is authorised as ``get``, and from Kubernetes 1.35 as ``create`` too).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import hashlib
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

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
    from kubernetes.aio.client import (
        ApiClient,
        Configuration,
        CoreV1Api,
        V1DeleteOptions,
        V1PersistentVolumeClaim,
        V1Pod,
        V1Preconditions,
    )
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
VOLUME_LABEL = "research-agent/volume"
"""On a claim (``pvc`` mode): :func:`volume_label` of its volume."""

Volumes = Literal["emptydir", "pvc"]
"""Where ``/data`` lives: the template's volume (goes with the pod), or a claim per volume."""
VOLUME_MODES: tuple[Volumes, ...] = ("emptydir", "pvc")
CLAIM_DELETE_TIMEOUT = 30.0
"""How long :meth:`KubernetesBackend.delete_volume` waits for a deleted claim to go."""

CANNOT_START = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                          "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                          "CrashLoopBackOff"})
"""Reasons a container waits for ever: a create that sees one gives up at once."""

COMMAND_START_TIMEOUT = 30.0
"""How long :meth:`KubernetesBackend.start_command` waits for the launcher to start a command."""

_T = TypeVar("_T")


def pod_name(sandbox_id: str) -> str:
    return f"agent-{check_sandbox_id(sandbox_id)}"


def session_label(tenant: str | None, session_id: str | None) -> str:
    """A label value for any legal session id of a tenant: 32 hex characters of the SHA-256 of
    ``tenant/session_id`` (session ids are per tenant); "" for none (a warm-pool pod)."""
    return hashlib.sha256(f"{tenant or ''}/{session_id}".encode()).hexdigest()[:32] if session_id else ""


def claim_name(installation: str, volume: str) -> str:
    """The PersistentVolumeClaim of ``volume`` in ``installation``: ``agent-data-`` and 32 hex
    characters of the SHA-256 of ``installation/volume``, a DNS label for any legal volume name."""
    return "agent-data-" + hashlib.sha256(f"{installation}/{check_volume(volume)}".encode()).hexdigest()[:32]


def volume_label(volume: str) -> str:
    """The label value naming ``volume`` on its claim: the name itself, or 32 hex characters of its
    SHA-256 where the name is no label value (64 characters, or ending in ``.``, ``_`` or ``-``)."""
    if len(check_volume(volume)) <= 63 and volume[-1].isalnum():
        return volume
    return hashlib.sha256(volume.encode()).hexdigest()[:32]


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


def _data_volume(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod's volume that the server container mounts at :data:`DATA_DIR`."""
    mount = next(m for m in _server_container(pod).get("volumeMounts") or [] if m["mountPath"] == DATA_DIR)
    volume: dict[str, Any] = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    return volume


class KubernetesBackend(SandboxBackend):
    """Pods in one namespace (see the module doc)."""

    name = "kubernetes"

    def __init__(self, pod_template: Path = DEFAULT_POD_TEMPLATE, namespace: str = "default",
                 installation: str = "default", *, kubeconfig: Path | None = None, api_client: ApiClient | None = None,
                 image: str | None = None, start_timeout: float = 120.0, stop_timeout: int = 5,
                 volumes: Volumes = "emptydir", volume_size: str = "1Gi", storage_class: str | None = None) -> None:
        """``api_client`` is a ``kubernetes.aio.client.ApiClient`` (then not closed here);
        without one, the client uses ``kubeconfig``, or the pod's service account when
        that is ``None``. ``image`` replaces the template's. ``volumes`` is the mode of the
        module doc; in ``pvc`` mode each claim asks for ``volume_size`` (a quantity such as
        ``1Gi``) of ``storage_class`` (``None``: the cluster's default). Raises
        :class:`SandboxError` without the client, a usable template (in ``pvc`` mode: one
        whose server mounts a volume at ``/data``), or a kubeconfig file or cluster to use."""
        if not _HAVE_CLIENT:
            raise SandboxError(CLIENT_MISSING)
        if volumes not in VOLUME_MODES:
            raise ValueError(f"volumes must be one of {', '.join(VOLUME_MODES)}, not {volumes!r}")
        self._template = load_pod_template(pod_template)
        if volumes == "pvc":
            try:
                _data_volume(self._template)
            except (KeyError, TypeError, StopIteration):
                raise SandboxError(f"the pod template {pod_template} needs a volume mounted at {DATA_DIR} "
                                   f"in the container {SERVER_CONTAINER!r}: it becomes the session's claim") from None
        if image is not None:
            _server_container(self._template)["image"] = image
        self.namespace = namespace
        self.installation = installation
        self.volumes = volumes
        self.volume_size = volume_size
        self.storage_class = storage_class
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
                              SANDBOX_LABEL: spec.sandbox_id, SESSION_LABEL: session_label(spec.tenant, spec.session_id)}
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
        if self.volumes == "pvc":
            data = _data_volume(pod)
            name = data["name"]
            data.clear()
            data.update(name=name, persistentVolumeClaim={"claimName": claim_name(self.installation, spec.volume)})
        return pod

    def claim_manifest(self, volume: str) -> dict[str, Any]:
        """The PersistentVolumeClaim of ``volume`` (``pvc`` mode; see the module doc)."""
        claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                      "resources": {"requests": {"storage": self.volume_size}}}
        if self.storage_class is not None:
            claim_spec["storageClassName"] = self.storage_class
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim_name(self.installation, volume), "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/name": "research-agent",
                                        "app.kubernetes.io/component": "sandbox-volume",
                                        INSTALLATION_LABEL: self.installation, VOLUME_LABEL: volume_label(volume)},
                             "annotations": {VOLUME_ANNOTATION: volume, CREATED_ANNOTATION: repr(time.time())}},
                "spec": claim_spec}

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create the pod (in ``pvc`` mode first its volume's claim, if missing) and return
        once its ``Ready`` condition is true. A pod that cannot start (its image cannot be
        pulled, its server exits, it is not ready within ``start_timeout``) is deleted, a
        claim this call made is deleted too, and :class:`SandboxError` says why."""
        return await finish_or_delete(self._create(spec), self.delete)

    async def _create(self, spec: SandboxSpec) -> Sandbox:
        made_claim = self.volumes == "pvc" and await self._ensure_claim(spec.volume)
        try:
            body = cast(V1Pod, V1Pod.from_dict(self.manifest(spec)))  # None only for a None dict
            created = await self._call(lambda api: api.create_namespaced_pod(self.namespace, body), allow=(409,))
            if created is None:
                raise SandboxError(f"sandbox {spec.sandbox_id} exists already")
            try:
                return await self._until_ready(spec.sandbox_id)
            except BaseException:
                await self._remove(spec.sandbox_id, grace_seconds=0)
                raise
        except BaseException:
            if made_claim:
                with contextlib.suppress(SandboxError):
                    await self._delete_claim(spec.volume)
            raise

    async def _ensure_claim(self, volume: str) -> bool:
        """Make the claim of ``volume`` unless this installation has it already; whether this
        call made it. :class:`SandboxError` if the claim there is being deleted, or is not
        this installation's (then it is left alone)."""
        name = claim_name(self.installation, volume)
        body = cast(V1PersistentVolumeClaim, V1PersistentVolumeClaim.from_dict(self.claim_manifest(volume)))
        for _ in range(3):  # a claim deleted between the refused create and the read: create again
            created = await self._call(
                lambda api: api.create_namespaced_persistent_volume_claim(self.namespace, body), allow=(409,))
            if created is not None:
                return True
            claim = await self._call(lambda api: api.read_namespaced_persistent_volume_claim(name, self.namespace))
            if claim is None:
                continue
            if not self._owns(claim, volume):
                raise SandboxError(f"volume {volume}: the claim {name} is not this installation's")
            if claim.metadata is not None and claim.metadata.deletion_timestamp is not None:
                raise SandboxError(f"volume {volume} is being deleted (claim {name})")
            return False
        raise SandboxError(f"volume {volume}: cannot create the claim {name}")

    def _owns(self, claim: V1PersistentVolumeClaim, volume: str) -> bool:
        """Whether ``claim`` is this installation's claim of ``volume``."""
        metadata = claim.metadata
        labels = metadata.labels if metadata is not None and metadata.labels else {}
        annotations = metadata.annotations if metadata is not None and metadata.annotations else {}
        return labels.get(INSTALLATION_LABEL) == self.installation and annotations.get(VOLUME_ANNOTATION) == volume

    async def _delete_claim(self, volume: str) -> None:
        """Delete this installation's claim of ``volume`` and wait until it is gone (the API
        keeps a claim that a pod still uses: ``kubernetes.io/pvc-protection``). One that is
        gone, or not this installation's, is left alone."""
        name = claim_name(self.installation, volume)
        claim = await self._call(lambda api: api.read_namespaced_persistent_volume_claim(name, self.namespace))
        if claim is None or claim.metadata is None or not self._owns(claim, volume):
            return
        uid = claim.metadata.uid
        # The uid as a precondition: a claim made again meanwhile (409) is not the one we read.
        options = V1DeleteOptions(preconditions=V1Preconditions(uid=uid))
        await self._call(lambda api: api.delete_namespaced_persistent_volume_claim(name, self.namespace, body=options),
                         allow=(409,))
        deadline = time.monotonic() + CLAIM_DELETE_TIMEOUT
        delay = 0.02
        while (left := await self._call(lambda api: api.read_namespaced_persistent_volume_claim(
                name, self.namespace))) is not None and left.metadata is not None and left.metadata.uid == uid:
            if time.monotonic() + delay > deadline:
                raise SandboxError(f"volume {volume}: its claim {name} is still in use after "
                                   f"{CLAIM_DELETE_TIMEOUT:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

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

    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        """Delete the pod (SIGTERM: the server drains; SIGKILL after ``stop_timeout``, or at
        once) and wait until it is gone, so nothing of it runs once this returns."""
        if await self._read(sandbox_id) is not None:
            await self._remove(sandbox_id, 0 if at_once else self._stop_timeout)

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
        """A volume still named by a pod of this installation that runs (or is starting, or
        being deleted) raises :class:`SandboxError`, as on every backend. In ``pvc`` mode the
        volume's claim is then deleted, and this waits until it is gone; the API keeps a claim
        while any pod names it, so pods of the volume whose server has ended (failed: their
        sandbox is gone) are deleted first. In ``emptydir`` mode nothing is left to remove:
        ``/data`` went with its pod, and the conversation is in the SessionStore, which the
        server clears on ``DELETE /sessions/{id}``."""
        check_volume(volume)
        users: builtins.list[str] = []
        ended: builtins.list[str] = []
        for pod in await self._pods():
            if _annotations(pod).get(VOLUME_ANNOTATION) != volume:
                continue
            if _has_ended(pod):
                ended.append(_labels(pod)[SANDBOX_LABEL])
            elif self.volumes == "pvc" or _is_live(pod):  # pvc: a pod being deleted still holds the claim
                users.append(_labels(pod)[SANDBOX_LABEL])
        if users:
            raise SandboxError(f"volume {volume} is in use by sandbox {', '.join(users)}")
        if self.volumes == "pvc":
            for sandbox_id in ended:
                await self._remove(sandbox_id, grace_seconds=0)
            await self._delete_claim(volume)

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
            {"op": "replace", "path": labels + _pointer(SESSION_LABEL), "value": session_label(tenant, session_id)},
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
        annotations = _annotations(pod)
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


def _annotations(pod: V1Pod) -> dict[str, str]:
    return pod.metadata.annotations if pod.metadata and pod.metadata.annotations else {}


def _is_live(pod: V1Pod) -> bool:
    """Starting or running, and not being deleted."""
    deleting = pod.metadata is None or pod.metadata.deletion_timestamp is not None
    return not deleting and pod.status is not None and pod.status.phase in ("Pending", "Running")


def _has_ended(pod: V1Pod) -> bool:
    """Its server has ended (phase ``Failed`` or ``Succeeded``) and nobody is deleting it yet."""
    deleting = pod.metadata is None or pod.metadata.deletion_timestamp is not None
    return not deleting and pod.status is not None and pod.status.phase in ("Failed", "Succeeded")


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
