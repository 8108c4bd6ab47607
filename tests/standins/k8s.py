"""A stand-in of the Kubernetes pods API, for the kubernetes sandbox backend's tests.

No kube-apiserver runs on these machines, so this serves the calls the backend makes,
over real HTTP on 127.0.0.1, with the API's semantics for them: pods ``create`` (409
AlreadyExists; 422 Invalid for names, label keys or values the API refuses), ``get``,
``list`` with an equality-based ``labelSelector`` (all the backend sends),
``patch`` with a JSON Patch only (RFC 6902 through ``jsonpatch``: a failed ``test`` is
422; any other content type 415; changing the pod's spec 422, as the API forbids) and
``delete`` (404 when gone; graceful unless ``gracePeriodSeconds`` is 0). Every change
bumps ``resourceVersion``; errors are ``Status`` objects; requests need the bearer token.
Anything else (another path, verb, resource, a watch) is refused with 404 or 405 and
recorded in :attr:`PodsApiStandIn.unexpected`, which the tests assert empty.

PersistentVolumeClaims, for the backend's ``pvc`` mode: ``create`` (409 AlreadyExists; 422
Invalid for a bad name or labels, no access mode or one the API does not know, or no storage
request that is a quantity; the admission plugin's ``kubernetes.io/pvc-protection`` finalizer
added; phase ``Pending`` until a pod using the claim is scheduled, then ``Bound``, as with a
``WaitForFirstConsumer`` class such as kind's), ``get`` and ``delete`` (404 when gone; a
``preconditions.uid`` that does not match is 409 Conflict). Deleting a claim sets its
``deletionTimestamp``; the object goes (and with it the data) once no scheduled pod names it,
whatever that pod's phase, as the PVC protection controller decides. ``list`` and anything
else on claims are refused as unexpected: the backend does not send them.

The ``exec`` subresource is served as the API serves it to the client library: a
WebSocket ``GET .../pods/{name}/exec`` with ``command`` (repeated), ``container``,
``stdin``, ``stdout``, ``stderr`` and ``tty`` in the query, subprotocol
``v4.channel.k8s.io`` (the first byte of each binary message is its channel: 0 stdin,
1 stdout, 2 stderr, 3 a ``Status``: ``Success``, or ``Failure`` with reason
``NonZeroExitCode`` and the exit code in ``details.causes``, as the kubelet sends it).
It is recorded as ``get`` and ``create`` of ``pods/exec``: RBAC authorises a WebSocket
exec as ``get``, and API servers from 1.35 also check ``create``. A refused handshake is an
HTTP ``Status``: 404 for an unknown pod, 400 for one that is not running (pending, or
completed). A TTY, another container, no command or another subprotocol is refused and
recorded as unexpected. The command runs as a real process with the pod's container
environment, in the image's working dir, without a terminal; when the client goes away its
stdin closes (its output is read and dropped), as a container runtime does.

A thread plays the scheduler, the kubelet and the PVC protection controller. A pod that
names a claim that is missing or being deleted stays ``Pending``, unscheduled
(``PodScheduled`` false, reason ``Unschedulable``), until the claim is there; a scheduled pod
gets ``spec.nodeName``. A pending pod whose image is known starts as a real
``agent-server`` process (``python -m hosting.server``, the image's ``serve``) on a
loopback address of its own, ``127.x.y.z``: all of 127.0.0.0/8 is loopback on Linux,
so every pod listens on its container port (8000) as in a cluster, and that address is
its ``status.podIP``. The container's environment is the pod's, translated as a
container runtime would place it: ``emptyDir`` mount paths become temp dirs, a claim's its
directory, which outlives the pod (so the next pod on that claim finds its files), and
``0.0.0.0`` the pod's address (a pod's network namespace holds only its own), over the
image's own: ``PATH`` starts with this interpreter's directory (the image's venv, where
``python3`` has ``hosting``). The pod turns Running, and Ready only while its readiness probe, run as the spec says (path,
port, headers), answers 2xx or 3xx. A server that exits fails the pod (``restartPolicy:
Never``); a deleted pod's server gets SIGTERM, then SIGKILL for its whole process group
after the grace period, and the object goes once nothing of it runs. An unknown image
waits in ``ErrImagePull``. Every process of a pod (its server, what that starts, what
``exec`` starts, even in sessions of their own) carries the pod's uid in the environment
variable :data:`POD_TAG`, which stands for the container's PID namespace: when the pod is
deleted or its server exits, every process carrying its tag is killed, as a container's
are when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

ROOT = Path(__file__).resolve().parents[2]
POD_TEMPLATE = ROOT / "hosting" / "kubernetes" / "base" / "agent-pod-template.yaml"
PODS = "/api/v1/namespaces/{namespace}/pods"
CLAIMS = "/api/v1/namespaces/{namespace}/persistentvolumeclaims"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
ACCESS_MODES = frozenset({"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"})
NODE = "standin-node"
JSON_PATCH = "application/json-patch+json"
IMAGE_ID = "docker-pullable://research-agent@sha256:" + "0" * 64
KUBELET_PERIOD = 0.05
"""How often the kubelet thread looks at the pods."""
PROBE_PERIOD = 0.2
"""How often it probes a pod's readiness at most: faster than the template's period, so
tests do not wait, and no faster, so probes do not load the machine."""
POD_TAG = "K8S_STANDIN_POD"
"""The environment variable that marks every process of a pod (see :meth:`PodsApiStandIn._tag`)."""
EXEC_PROTOCOL = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR = 0, 1, 2, 3
"""The channels of an exec stream."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_SELECTOR_TERM = re.compile(r"([^\s!=]+)\s*(==|=|!=)\s*([^\s!=]*)")
_QUANTITY = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[kMGTPE]|[eE][0-9]+)?")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, name: str | None = None, kind: str = "pods") -> JSONResponse:
    """An API error: a ``Status`` object, as the API sends it."""
    details = {"name": name, "kind": kind} if name else {}
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "details": details, "code": code}, status_code=code)


def label_errors(labels: dict[str, Any]) -> list[str]:
    """What the API's validation says of these labels (keys: optional DNS-subdomain
    prefix and ``/``, then a name of at most 63; values: at most 63, same alphabet, or empty)."""
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))) or len(name) > 63 \
                or not _LABEL_NAME.fullmatch(name):
            errors.append(f"metadata.labels: Invalid value: {key!r}: name part must consist of alphanumeric "
                          "characters, '-', '_' or '.'")
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_NAME.fullmatch(value)):
            errors.append(f"metadata.labels: Invalid value: {value!r}: a valid label must be an empty string or "
                          "consist of alphanumeric characters, '-', '_' or '.', at most 63 characters")
    return errors


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Whether ``labels`` match an equality-based label selector (``k=v``, ``k==v``,
    ``k!=v``, comma-separated: all the backend sends); :class:`ValueError` for any other."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = _SELECTOR_TERM.fullmatch(term)
        if match is None:
            raise ValueError(f"the stand-in serves only equality-based selectors, not {term!r}")
        key, operator, value = match.groups()
        if (labels.get(key) == value) != (operator != "!="):
            return False
    return True


class PodRuntime:
    """What runs of a pod here: its server process and its address."""

    def __init__(self, process: subprocess.Popen[bytes], ip: str, env: dict[str, str]) -> None:
        self.process = process
        self.ip = ip
        self.env = env
        """The container's environment, which ``exec`` gives its commands too."""
        self.grace_ends: float | None = None
        self.next_probe = 0.0


class ExecChannels:
    """The channels of one exec's WebSocket: output goes out while the client is there,
    and is read and dropped once it has gone, as a container runtime does."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.connected = True

    async def send(self, channel: int, data: bytes) -> None:
        if self.connected:
            try:
                await self.websocket.send_bytes(bytes([channel]) + data)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.connected = False

    async def relay(self, stream: asyncio.StreamReader, channel: int) -> None:
        while chunk := await stream.read(65536):
            await self.send(channel, chunk)

    async def end(self, ended: dict[str, Any]) -> None:
        """The ``Status`` on the error channel, then the close."""
        await self.send(ERROR, json.dumps(ended).encode())
        if self.connected:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.websocket.close()


class PodsApiStandIn:
    """The pods API of one namespace, with a kubelet that runs real servers (see the module doc)."""

    def __init__(self, root: Path, *, namespace: str = "default", images: frozenset[str] = frozenset(
            {"research-agent:latest"})) -> None:
        self.root = root
        self.namespace = namespace
        self.images = images
        self.token = f"standin-{uuid.uuid4().hex}"
        self._instance = uuid.uuid4().hex
        self.requests: list[tuple[str, str]] = []
        """Every (verb, resource) received, in order."""
        self.unexpected: list[str] = []
        self.patch_types: list[str] = []
        """The ``Content-Type`` of every PATCH received."""
        self.exec_urls: list[str] = []
        """The path and query of every exec received, as an API server's audit log has them."""
        self._pods: dict[str, dict[str, Any]] = {}
        self._claims: dict[str, dict[str, Any]] = {}
        self._running: dict[str, PodRuntime] = {}
        self._version = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._threads: list[threading.Thread] = []
        self._probe = httpx.Client(timeout=1.0)
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PodsApiStandIn:
        app = Starlette(routes=[
            Route(PODS, self._collection, methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
            Route(PODS + "/{name}", self._item, methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
            Route(CLAIMS, self._claim_collection, methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
            Route(CLAIMS + "/{name}", self._claim_item, methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
            Route("/{path:path}", self._elsewhere, methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
            WebSocketRoute(PODS + "/{name}/exec", self._exec),
            WebSocketRoute("/{path:path}", self._websocket_elsewhere),
        ])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        serving = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        kubelet = threading.Thread(target=self._kubelet, daemon=True)
        self._threads = [serving, kubelet]
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Kill every pod's processes and stop serving."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(15)
        with self._lock:
            for name in list(self._running):
                self._end(name)
            self._pods.clear()
            self._claims.clear()
        shutil.rmtree(self.root / "claims", ignore_errors=True)
        self._probe.close()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file for this API (plain HTTP, the bearer token, the namespace)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "gateway", "user": {"token": self.token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "gateway",
                                                          "namespace": self.namespace}}],
        }))
        return path

    # --- what tests look at ----------------------------------------------------------------

    @property
    def verbs(self) -> set[tuple[str, str]]:
        return set(self.requests)

    def pod(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            pod = self._pods.get(name)
            return copy.deepcopy(pod) if pod is not None else None

    def pod_names(self) -> set[str]:
        with self._lock:
            return set(self._pods)

    def claim(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            claim = self._claims.get(name)
            return copy.deepcopy(claim) if claim is not None else None

    def claim_names(self) -> set[str]:
        with self._lock:
            return set(self._claims)

    def claim_dir(self, name: str) -> Path:
        """Where a claim's data lives (its volume, as the pods that mount it see it)."""
        return self.root / "claims" / name

    def environment(self, name: str) -> dict[str, str] | None:
        """The environment a running pod's container got (paths placed as the runtime placed them)."""
        with self._lock:
            running = self._running.get(name)
            return dict(running.env) if running is not None else None

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            running = self._running.get(name)
            return running.process if running is not None else None

    def traces(self, name: str) -> list[str]:
        """What is left of a pod: its object, its server process, its dirs."""
        with self._lock:
            found = [f"pod {name}"] if name in self._pods else []
            running = self._running.get(name)
            if running is not None:
                found.append(f"process {running.process.pid}")
        found += [f"process {pid}" for pid in _tagged_pids(self._tag(name)) if running is None or pid != running.process.pid]
        return found + [f"dir {d}" for d in (self.root / "pods" / name).glob("*")]

    def kill(self, name: str, timeout: float = 10.0) -> None:
        """Crash the pod's server (SIGKILL, its whole process group) and wait until the
        kubelet has recorded it (phase Failed), as it would on a node."""
        process = self.process(name)
        assert process is not None, f"pod {name} runs no process"
        os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while (self.pod(name) or {}).get("status", {}).get("phase") != "Failed":
            assert time.monotonic() < deadline, f"the kubelet did not see pod {name} die"
            time.sleep(0.02)

    # --- the API ----------------------------------------------------------------------------

    def _tag(self, name: str) -> str:
        """The :data:`POD_TAG` of a pod: this stand-in's and the pod's name, so that tests running
        side by side never take each other's processes for their own."""
        return f"{self._instance}/{name}"

    def _record(self, verb: str, resource: str = "pods") -> None:
        with self._lock:
            self.requests.append((verb, resource))

    def _refuse(self, request: HTTPConnection, code: int, why: str) -> JSONResponse:
        with self._lock:
            method = request.scope.get("method", "GET (WebSocket)")
            self.unexpected.append(f"{method} {request.url.path}?{request.url.query}: {why}")
        reason = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 415: "UnsupportedMediaType"}[code]
        return status(code, reason, why)

    def _authorised(self, request: HTTPConnection) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _check(self, request: HTTPConnection) -> JSONResponse | None:
        if not self._authorised(request):
            return status(401, "Unauthorized", "Unauthorized")
        if request.path_params["namespace"] != self.namespace:
            return self._refuse(request, 404, f"namespace {request.path_params['namespace']!r} is not served here")
        return None

    async def _elsewhere(self, request: Request) -> Response:
        return self._refuse(request, 404, "the stand-in serves only the pods of its namespace")

    async def _collection(self, request: Request) -> Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        if request.method == "POST":
            self._record("create")
            return self._create(await request.json())
        if request.method == "GET" and request.query_params.get("watch") not in (None, "false", "0"):
            return self._refuse(request, 405, "watch is not served by the stand-in")
        if request.method == "GET":
            self._record("list")
            try:
                return self._list(request.query_params.get("labelSelector", ""))
            except ValueError as exc:
                return self._refuse(request, 400, str(exc))
        return self._refuse(request, 405, f"{request.method} on the pods collection")

    async def _item(self, request: Request) -> Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        name = request.path_params["name"]
        if request.method == "GET":
            self._record("get")
            with self._lock:
                pod = self._pods.get(name)
                return JSONResponse(pod) if pod else status(404, "NotFound", f'pods "{name}" not found', name)
        if request.method == "PATCH":
            self._record("patch")
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            self.patch_types.append(content_type)
            if content_type != JSON_PATCH:
                return self._refuse(request, 415, f"the body of a patch must be {JSON_PATCH}, not {content_type!r}")
            return self._patch(name, await request.body())
        if request.method == "DELETE":
            self._record("delete")
            body = await request.body()
            options = json.loads(body) if body else {}
            grace = options.get("gracePeriodSeconds", request.query_params.get("gracePeriodSeconds"))
            return self._delete(name, None if grace is None else int(grace))
        return self._refuse(request, 405, f"{request.method} on a pod")

    async def _claim_collection(self, request: Request) -> Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        if request.method == "POST":
            self._record("create", "persistentvolumeclaims")
            return self._create_claim(await request.json())
        return self._refuse(request, 405, f"{request.method} on the claims collection: the backend sends only create")

    async def _claim_item(self, request: Request) -> Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        name = request.path_params["name"]
        if request.method == "GET":
            self._record("get", "persistentvolumeclaims")
            with self._lock:
                claim = self._claims.get(name)
                return JSONResponse(claim) if claim else status(
                    404, "NotFound", f'persistentvolumeclaims "{name}" not found', name, "persistentvolumeclaims")
        if request.method == "DELETE":
            self._record("delete", "persistentvolumeclaims")
            body = await request.body()
            options = json.loads(body) if body else {}
            return self._delete_claim(name, (options.get("preconditions") or {}).get("uid"))
        return self._refuse(request, 405, f"{request.method} on a claim: the backend sends only get and delete")

    def _create_claim(self, claim: dict[str, Any]) -> JSONResponse:
        metadata = claim.setdefault("metadata", {})
        name = metadata.get("name", "")
        if metadata.get("namespace", self.namespace) != self.namespace:
            return status(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                             "sent on the request")
        errors = label_errors(metadata.get("labels") or {})
        if not name or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            errors.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain")
        spec = claim.get("spec") or {}
        modes = spec.get("accessModes") or []
        if not modes:
            errors.append("spec.accessModes: Required value: at least 1 access mode is required")
        errors += [f"spec.accessModes: Unsupported value: {mode!r}" for mode in modes if mode not in ACCESS_MODES]
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        quantity = _QUANTITY.fullmatch(storage) if isinstance(storage, str) else None
        if storage is None:
            errors.append("spec.resources[storage]: Required value")
        elif quantity is None or not float(quantity.group(1)):
            errors.append(f"spec.resources[storage]: Invalid value: {storage!r}: must be a quantity greater than zero")
        if errors:
            return status(422, "Invalid", f'PersistentVolumeClaim "{name}" is invalid: {"; ".join(errors)}', name,
                          "persistentvolumeclaims")
        with self._lock:
            if name in self._claims:
                return status(409, "AlreadyExists", f'persistentvolumeclaims "{name}" already exists', name,
                              "persistentvolumeclaims")
            metadata.update(namespace=self.namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                            finalizers=[*(metadata.get("finalizers") or []), PVC_PROTECTION])
            spec.setdefault("volumeMode", "Filesystem")
            claim["status"] = {"phase": "Pending"}
            self._version += 1
            metadata["resourceVersion"] = str(self._version)
            self._claims[name] = claim
            return JSONResponse(claim, status_code=201)

    def _delete_claim(self, name: str, uid: str | None) -> JSONResponse:
        with self._lock:
            claim = self._claims.get(name)
            if claim is None:
                return status(404, "NotFound", f'persistentvolumeclaims "{name}" not found', name,
                              "persistentvolumeclaims")
            metadata = claim["metadata"]
            if uid is not None and uid != metadata["uid"]:
                return status(409, "Conflict", f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                                               f"{metadata['uid']}", name, "persistentvolumeclaims")
            if not metadata.get("finalizers"):
                self._drop_claim(name)
                return JSONResponse(claim)
            if not metadata.get("deletionTimestamp"):
                metadata.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                self._version += 1
                metadata["resourceVersion"] = str(self._version)
            return JSONResponse(claim)

    def _drop_claim(self, name: str) -> None:
        """The claim object goes, and with it its volume (reclaim policy ``Delete``)."""
        self._claims.pop(name, None)
        shutil.rmtree(self.claim_dir(name), ignore_errors=True)

    def _claim_users(self, name: str) -> list[str]:
        """The scheduled pods that name the claim, in any phase: what keeps it from going."""
        return [pod_name for pod_name, pod in self._pods.items() if pod["spec"].get("nodeName") and name in _claims_of(pod)]

    def _protect_claims(self) -> None:
        """The PVC protection controller: a claim being deleted goes once no pod uses it."""
        with self._lock:
            for name, claim in list(self._claims.items()):
                if claim["metadata"].get("deletionTimestamp") and not self._claim_users(name):
                    claim["metadata"]["finalizers"] = [f for f in claim["metadata"]["finalizers"] if f != PVC_PROTECTION]
                    if not claim["metadata"]["finalizers"]:
                        self._drop_claim(name)

    async def _websocket_elsewhere(self, websocket: WebSocket) -> None:
        await websocket.send_denial_response(self._refuse(websocket, 404, "the stand-in serves WebSockets only for exec"))

    async def _exec(self, websocket: WebSocket) -> None:
        """``pods/exec``: the command as a real process, its stdio over the v4 channel protocol."""
        refused = self._check(websocket)
        if refused is None:
            self._record("get", "pods/exec")
            self._record("create", "pods/exec")
            with self._lock:
                self.exec_urls.append(f"{websocket.url.path}?{websocket.url.query}")
        target = refused or self._exec_target(websocket)
        if not isinstance(target, PodRuntime):
            await websocket.send_denial_response(target)
            return
        query = websocket.query_params
        wanted = {name: query.get(name) == "true" for name in ("stdin", "stdout", "stderr")}
        await websocket.accept(subprotocol=EXEC_PROTOCOL)
        try:
            await self._run_exec(websocket, query.getlist("command"), target.env, wanted)
        except Exception as exc:  # noqa: BLE001 - a stand-in bug must fail the test, not vanish in a log
            with self._lock:
                self.unexpected.append(f"exec in pod {websocket.path_params['name']}: {exc!r}")

    def _exec_target(self, websocket: WebSocket) -> JSONResponse | PodRuntime:
        """The running pod to exec in, or the API's answer why not."""
        query = websocket.query_params
        name = websocket.path_params["name"]
        flags = {flag: query.get(flag, "false") for flag in ("stdin", "stdout", "stderr", "tty")}
        if set(query) - {"command", "container", *flags}:
            return self._refuse(websocket, 400, f"exec parameters the stand-in does not serve: {sorted(query)}")
        if any(value not in ("true", "false") for value in flags.values()) or flags["tty"] == "true":
            return self._refuse(websocket, 400, f"the stand-in runs exec without a TTY, flags true or false: {flags}")
        if EXEC_PROTOCOL not in websocket.scope.get("subprotocols", []):
            return self._refuse(websocket, 400, f"the stand-in serves exec over {EXEC_PROTOCOL} only")
        if not query.getlist("command"):
            return self._refuse(websocket, 400, "you must specify at least 1 command")
        if "true" not in (flags["stdin"], flags["stdout"], flags["stderr"]):
            return status(400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr")
        with self._lock:
            pod = self._pods.get(name)
            if pod is None:
                return status(404, "NotFound", f'pods "{name}" not found', name)
            container = query.get("container") or _server(pod)["name"]
            if container != _server(pod)["name"]:
                return self._refuse(websocket, 400, f"container {container} is not valid for pod {name}")
            phase = pod["status"]["phase"]
            if phase in ("Succeeded", "Failed"):
                return status(400, "BadRequest", f"cannot exec into a container in a completed pod; current phase is {phase}")
            running = self._running.get(name)
            if phase != "Running" or running is None or running.process.poll() is not None:
                return status(400, "BadRequest", f'unable to upgrade connection: container not found ("{container}")')
            return running

    async def _run_exec(self, websocket: WebSocket, command: list[str], env: dict[str, str],
                        wanted: dict[str, bool]) -> None:
        def pipe(stream: str) -> int:
            return asyncio.subprocess.PIPE if wanted[stream] else asyncio.subprocess.DEVNULL

        channels = ExecChannels(websocket)
        try:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=ROOT, env=env, stdin=pipe("stdin"), stdout=pipe("stdout"), stderr=pipe("stderr"),
                start_new_session=True)
        except OSError as exc:  # what the runtime answers: a Failure without an exit code
            await channels.end({"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                                "message": f'OCI runtime exec failed: exec: "{command[0]}": {exc.strerror}'})
            return
        feeding = asyncio.create_task(self._feed_stdin(channels, process))
        await asyncio.gather(*(channels.relay(stream, channel) for stream, channel in
                               ((process.stdout, STDOUT), (process.stderr, STDERR)) if stream is not None))
        code = await process.wait()
        feeding.cancel()
        exit_code = 128 - code if code < 0 else code
        if not exit_code:
            await channels.end({"metadata": {}, "status": "Success"})
            return
        await channels.end({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                            "message": f"command terminated with non-zero exit code: error executing command "
                                       f"{command}, exit code {exit_code}",
                            "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}})

    async def _feed_stdin(self, channels: ExecChannels, process: asyncio.subprocess.Process) -> None:
        """Channel 0 to the command's stdin; when the client goes, its stdin closes."""
        while True:
            message = await channels.websocket.receive()
            if message["type"] == "websocket.disconnect":
                channels.connected = False
                if process.stdin is not None:
                    process.stdin.close()
                return
            data = message.get("bytes")
            if not data or data[0] != STDIN or process.stdin is None:
                with self._lock:
                    self.unexpected.append(f"exec: a message the stand-in does not serve: {message!r:.200}")
                continue
            process.stdin.write(data[1:])
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                await process.stdin.drain()

    def _create(self, pod: dict[str, Any]) -> JSONResponse:
        metadata = pod.setdefault("metadata", {})
        name = metadata.get("name", "")
        if metadata.get("namespace", self.namespace) != self.namespace:
            return status(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                             "sent on the request")
        errors = label_errors(metadata.get("labels") or {})
        if not name or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            errors.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain")
        containers = (pod.get("spec") or {}).get("containers") or []
        if not containers or any(not c.get("name") or not c.get("image") for c in containers):
            errors.append("spec.containers: Required value: each container needs a name and an image")
        if errors:
            return status(422, "Invalid", f'Pod "{name}" is invalid: {"; ".join(errors)}', name)
        with self._lock:
            if name in self._pods:
                return status(409, "AlreadyExists", f'pods "{name}" already exists', name)
            metadata.update(namespace=self.namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
            pod["status"] = {"phase": "Pending", "qosClass": "Burstable",
                             "conditions": [{"type": "PodScheduled", "status": "True"}]}
            self._store(name, pod)
            return JSONResponse(pod, status_code=201)

    def _list(self, selector: str) -> JSONResponse:
        with self._lock:
            items = [p for p in self._pods.values() if selector_matches(selector, p["metadata"].get("labels") or {})]
            return JSONResponse({"kind": "PodList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": str(self._version)}, "items": items})

    def _patch(self, name: str, body: bytes) -> JSONResponse:
        try:
            patch = jsonpatch.JsonPatch(json.loads(body))
        except (ValueError, jsonpatch.InvalidJsonPatch) as exc:
            return status(400, "BadRequest", f"invalid JSON Patch: {exc}", name)
        with self._lock:
            pod = self._pods.get(name)
            if pod is None:
                return status(404, "NotFound", f'pods "{name}" not found', name)
            try:
                patched = patch.apply(pod)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return status(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}",
                              name)
            fixed = ("spec", "status")
            if any(patched.get(part) != pod.get(part) for part in fixed) or any(
                    patched["metadata"].get(key) != pod["metadata"].get(key) for key in ("name", "namespace", "uid")):
                return status(422, "Invalid", f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change '
                                              "fields other than labels and annotations here", name)
            errors = label_errors(patched["metadata"].get("labels") or {})
            if errors:
                return status(422, "Invalid", f'Pod "{name}" is invalid: {"; ".join(errors)}', name)
            self._store(name, patched)
            return JSONResponse(patched)

    def _delete(self, name: str, grace: int | None) -> JSONResponse:
        with self._lock:
            pod = self._pods.get(name)
            if pod is None:
                return status(404, "NotFound", f'pods "{name}" not found', name)
            if grace is None:
                grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
            running = self._running.get(name)
            if grace == 0 or running is None or running.process.poll() is not None:
                self._end(name)
                return JSONResponse(self._pods.pop(name))
            metadata = pod["metadata"]
            metadata.setdefault("deletionTimestamp", _now())
            metadata["deletionGracePeriodSeconds"] = min(grace, metadata.get("deletionGracePeriodSeconds", grace))
            if running.grace_ends is None:
                running.process.send_signal(signal.SIGTERM)
            running.grace_ends = min(running.grace_ends or float("inf"), time.monotonic() + grace)
            self._store(name, pod)
            return JSONResponse(pod)

    def _store(self, name: str, pod: dict[str, Any]) -> None:
        self._version += 1
        pod["metadata"]["resourceVersion"] = str(self._version)
        self._pods[name] = pod

    # --- the kubelet ------------------------------------------------------------------------

    def _kubelet(self) -> None:
        while not self._stopping.wait(KUBELET_PERIOD):
            try:
                self._protect_claims()
            except Exception as exc:  # noqa: BLE001 - a controller bug must fail the test, not hang it
                with self._lock:
                    self.unexpected.append(f"pvc protection: {exc!r}")
            with self._lock:
                names = list(self._pods)
            for name in names:
                try:
                    self._sync(name)
                except Exception as exc:  # noqa: BLE001 - a kubelet bug must fail the test, not hang it
                    with self._lock:
                        self.unexpected.append(f"kubelet, pod {name}: {exc!r}")

    def _sync(self, name: str) -> None:
        with self._lock:
            pod = self._pods.get(name)
            if pod is None:
                return
            running = self._running.get(name)
            if running is not None and running.grace_ends is not None:
                if running.process.poll() is None and time.monotonic() < running.grace_ends:
                    return
                self._end(name)
                self._pods.pop(name, None)
                return
            phase = pod["status"]["phase"]
            if phase == "Pending" and running is None:
                self._start(name, pod)
                return
            if phase != "Running" or running is None:
                return
            code = running.process.poll()
            if code is not None:
                self._ended(name, pod, code)
                return
            if time.monotonic() < running.next_probe:
                return
            ready_probe = _server(pod).get("readinessProbe")
            running.next_probe = time.monotonic() + min(PROBE_PERIOD, (ready_probe or {}).get("periodSeconds", 10))
            address = running.ip
        ready = self._probe_ok(pod, ready_probe, address)
        with self._lock:
            pod = self._pods.get(name)
            if pod is None or pod["status"]["phase"] != "Running" or pod["metadata"].get("deletionTimestamp"):
                return
            self._set_ready(name, pod, ready)

    def _probe_ok(self, pod: dict[str, Any], probe: dict[str, Any] | None, ip: str) -> bool:
        if probe is None:
            return True
        get = probe["httpGet"]
        port = _port(pod, get["port"])
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        try:
            response = self._probe.get(f"http://{ip}:{port}{get.get('path', '/')}", headers=headers)
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 400

    def _schedule(self, name: str, pod: dict[str, Any]) -> bool:
        """Bind the pod to the node once every claim it names is there and not being deleted,
        as the scheduler does; a claim waiting for its first consumer is then bound."""
        if pod["spec"].get("nodeName"):
            return True
        for claim_name in _claims_of(pod):
            claim = self._claims.get(claim_name)
            why = ("not found" if claim is None
                   else "is being deleted" if claim["metadata"].get("deletionTimestamp") else None)
            if why is not None:
                unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": f'0/1 nodes are available: persistentvolumeclaim "{claim_name}" {why}.'}]
                if pod["status"].get("conditions") != unschedulable:
                    pod["status"]["conditions"] = unschedulable
                    self._store(name, pod)
                return False
        for claim_name in _claims_of(pod):
            claim = self._claims[claim_name]
            if claim["status"].get("phase") != "Bound":
                claim["spec"]["volumeName"] = f"pvc-{claim['metadata']['uid']}"
                claim["status"] = {"phase": "Bound", "accessModes": claim["spec"]["accessModes"],
                                   "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]}}
                self._version += 1
                claim["metadata"]["resourceVersion"] = str(self._version)
        pod["spec"]["nodeName"] = NODE
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        self._store(name, pod)
        return True

    def _start(self, name: str, pod: dict[str, Any]) -> None:
        if not self._schedule(name, pod):
            return
        container = _server(pod)
        if container["image"] not in self.images:
            self._waiting(name, pod, "ErrImagePull", f'failed to pull image "{container["image"]}": not found')
            return
        if len(pod["spec"]["containers"]) != 1 or container.get("command") or container.get("args") != ["serve"]:
            self._waiting(name, pod, "CreateContainerError", "the stand-in runs one container: the image's `serve`")
            return
        if any("value" not in entry for entry in container.get("env") or []):
            self._waiting(name, pod, "CreateContainerConfigError", "the stand-in supports only literal env values")
            return
        ip = self._free_ip(_port(pod, "http"))
        pod_dir = self.root / "pods" / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        mounts = {}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            if "emptyDir" in volume:
                mounts[mount["mountPath"]] = pod_dir / mount["name"]
            elif "persistentVolumeClaim" in volume:
                mounts[mount["mountPath"]] = self.claim_dir(volume["persistentVolumeClaim"]["claimName"])
            else:
                continue
            mounts[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]),
               "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        for entry in container.get("env") or []:
            env[entry["name"]] = _placed(entry["value"], mounts, ip)
        env[POD_TAG] = self._tag(name)
        log = self.root / "pods" / f"{name}.log"
        setpriv = shutil.which("setpriv")
        guard = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        with log.open("ab") as output:
            process = subprocess.Popen([*guard, sys.executable, "-m", "hosting.server"], cwd=ROOT, env=env,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self._running[name] = PodRuntime(process, ip, env)
        started = _now()
        pod["status"].update(
            phase="Running", podIP=ip, podIPs=[{"ip": ip}], hostIP="127.0.0.1", startTime=started,
            conditions=[{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                        {"type": "ContainersReady", "status": "False"}, {"type": "Ready", "status": "False"}],
            containerStatuses=[{"name": container["name"], "image": container["image"], "imageID": IMAGE_ID, "ready": False,
                                "restartCount": 0, "started": True, "state": {"running": {"startedAt": started}}}])
        self._store(name, pod)

    def _waiting(self, name: str, pod: dict[str, Any], reason: str, message: str) -> None:
        container = _server(pod)
        statuses = [{"name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
                     "state": {"waiting": {"reason": reason, "message": message}}}]
        if pod["status"].get("containerStatuses") != statuses:
            pod["status"]["containerStatuses"] = statuses
            self._store(name, pod)

    def _ended(self, name: str, pod: dict[str, Any], code: int) -> None:
        exit_code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as runtimes report
        container = pod["status"]["containerStatuses"][0]
        container.update(ready=False, started=False, state={"terminated": {
            "exitCode": exit_code, "reason": "Error" if exit_code else "Completed", "finishedAt": _now()}})
        pod["status"]["phase"] = "Failed" if exit_code else "Succeeded"
        _kill_tagged(self._tag(name))  # the container stopped: nothing of it runs on
        for condition in pod["status"]["conditions"]:
            if condition["type"] in ("Ready", "ContainersReady"):
                condition["status"] = "False"
        self._store(name, pod)

    def _set_ready(self, name: str, pod: dict[str, Any], ready: bool) -> None:
        value = "True" if ready else "False"
        ready_condition = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
        if ready_condition["status"] == value:
            return
        for condition in pod["status"]["conditions"]:
            if condition["type"] in ("Ready", "ContainersReady"):
                condition["status"] = value
        pod["status"]["containerStatuses"][0]["ready"] = ready
        self._store(name, pod)

    def _end(self, name: str) -> None:
        """Kill what runs of a pod (its server's process group, every process with its tag)
        and remove its emptyDirs."""
        running = self._running.pop(name, None)
        if running is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(10)
        _kill_tagged(self._tag(name))
        shutil.rmtree(self.root / "pods" / name, ignore_errors=True)  # its output (<name>.log) stays, to read

    def _free_ip(self, port: int) -> str:
        """A loopback address no pod uses, where ``port`` can be bound."""
        used = {r.ip for r in self._running.values()}
        for _ in range(100):
            ip = f"127.{random.randint(64, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if ip in used:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind((ip, port))
                except OSError:
                    continue
            return ip
        raise RuntimeError("no free loopback address")


def _server(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _claims_of(pod: dict[str, Any]) -> list[str]:
    """The claims a pod's volumes name."""
    return [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes") or []
            if "persistentVolumeClaim" in v]


def _port(pod: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    found: int = next(p["containerPort"] for p in _server(pod).get("ports") or [] if p.get("name") == port)
    return found


def _tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries ``POD_TAG=tag`` (a zombie's shows none)."""
    entry = f"{POD_TAG}={tag}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process of a pod, again until none is left (one may fork meanwhile)."""
    deadline = time.monotonic() + 10
    while pids := _tagged_pids(tag):
        assert time.monotonic() < deadline, f"processes {pids} of {tag} do not die"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _placed(value: str, mounts: dict[str, Path], ip: str) -> str:
    """An env value as the container sees its world: mount paths are the pod's dirs here."""
    if value == "0.0.0.0":
        return ip
    for path, directory in mounts.items():
        if value == path or value.startswith(path + "/"):
            return str(directory) + value[len(path):]
    return value


@contextlib.contextmanager
def running_standin(root: Path, **kwargs: Any) -> Iterator[PodsApiStandIn]:
    """A started stand-in; stopped (every pod's processes killed) however the test ends,
    and if it ended well, it must have been sent no call it does not implement."""
    standin = PodsApiStandIn(root, **kwargs).start()
    try:
        yield standin
    finally:
        standin.stop()
    assert standin.unexpected == []
