"""The RPCs of Modal's control plane that modal==1.6.4 calls for our flows, with Modal's semantics.

The pinned client's service is ``modal_proto.api_grpc.ModalClientBase``; this class
implements what the deploy script, the teardown script and the gateway's modal backend
call (found by running them), and every other RPC answers UNIMPLEMENTED naming itself and
is recorded in :attr:`ControlPlane.unimplemented`, which the fixture turns into a failed
test. Requests whose handler breaks are recorded in :attr:`ControlPlane.errors` likewise.

Commands in a sandbox (``Sandbox.exec``) do not go through the control plane: it hands out
the sandbox's task id (``SandboxGetTaskIdV2``) and the address of the task's command router
with a JWT for that task only (``SandboxGetCommandRouterAccess``), and the client talks to
the router (:mod:`tests.standins.modal.command_router`).

Semantics kept: workspace credentials on every call (UNAUTHENTICATED otherwise), a short
lived JWT from ``AuthTokenGet`` required by the sandbox RPCs, named objects that are found,
created if missing or refused if they exist as the request's creation type says, sandbox
names unique among an app's running sandboxes, tags that filter lists (a sandbox matches
if it has at least the tags asked for), a lifetime ``timeout`` after which a sandbox is
terminated, memory and CPU limits (``memory_mb_max``, ``milli_cpu_max``) as the container's
cgroup limits, and ids that are not of the V1 sandbox shape (``sb-`` + 22 base62 characters
would route the client to the V1 RPCs). Not modelled: ``idle_timeout`` (recorded, never
enforced: no test waits that long), regions, requests (only limits), and blobs (files above 4 MiB).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from google.protobuf import empty_pb2
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream
from modal_proto import api_grpc, api_pb2

from tests.standins.modal.engine import Engine
from tests.standins.modal.tunnels import TestCA, Tunnel

BUILDER_VERSION = "2026.10"
CREATE_IF_MISSING = api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
FAIL_IF_EXISTS = api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS
OVERWRITE = api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS
SUCCESS = api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
FAILURE = api_pb2.GenericResult.GENERIC_STATUS_FAILURE
TERMINATED = api_pb2.GenericResult.GENERIC_STATUS_TERMINATED
STOP_GRACE_SECONDS = 5
TOKEN_LIFETIME_SECONDS = 3600


def new_id(prefix: str) -> str:
    """``prefix-`` and 24 hex digits: never the V1 sandbox shape (22 base62 characters)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def sign_jwt(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 JWT of ``claims`` (Modal's tokens are JWTs: the client reads their ``exp``)."""
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    signed = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}"
    signature = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def verified_claims(key: bytes, token: str) -> dict[str, Any] | None:
    """The claims of a token signed with ``key`` that has not expired; ``None`` otherwise."""
    signed, _, signature = token.rpartition(".")
    expected = base64.urlsafe_b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest())
    if not signed or not hmac.compare_digest(signature.encode(), expected.rstrip(b"=")):
        return None
    payload = signed.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims if float(claims["exp"]) > time.time() else None


@dataclass
class NamedObject:
    object_id: str
    name: str


@dataclass
class SecretObject(NamedObject):
    env: dict[str, str] = field(repr=False)


@dataclass
class VolumeObject(NamedObject):
    path: Path


@dataclass
class DictObject(NamedObject):
    entries: dict[bytes, bytes] = field(default_factory=dict, repr=False)


@dataclass
class ImageBuild:
    image_id: str
    tag: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: api_pb2.GenericResult | None = None


@dataclass
class SandboxRecord:
    sandbox_id: str
    app_id: str
    name: str
    tags: dict[str, str]
    container: str
    created_at: float
    timeout_secs: int
    idle_timeout_secs: int
    image_id: str
    container_port: int
    tunnel: Tunnel
    result: api_pb2.GenericResult | None = None
    timer: asyncio.TimerHandle | None = None
    output: str = ""
    """The container's output once it has exited (for a test's failure message)."""

    @property
    def running(self) -> bool:
        return self.result is None

    @property
    def task_id(self) -> str:
        """The id of the task running it; a V2 sandbox's ends in ``V`` (the client tells them apart by it)."""
        return f"ta-{self.sandbox_id[3:]}V"


class ControlPlane(api_grpc.ModalClientBase):
    """The implemented RPCs and the state behind them (one workspace, one environment)."""

    def __init__(self, engine: Engine, ca: TestCA, root: Path, token_id: str, token_secret: str) -> None:
        self.engine = engine
        self.ca = ca
        self.root = root
        self.token_id = token_id
        self._token_secret = token_secret
        self._jwt_key = secrets.token_bytes(32)
        self.router_key = secrets.token_bytes(32)
        """Signs the command router's tokens (never valid at the control plane, nor the reverse)."""
        self.router_url = ""
        """``https://127.0.0.1:<port>`` of the command router, set by the server that runs it."""
        self.calls: list[str] = []
        self.unimplemented: list[str] = []
        self.errors: list[str] = []
        self.apps: dict[str, NamedObject] = {}
        self.secrets: dict[str, SecretObject] = {}
        self.volumes: dict[str, VolumeObject] = {}
        self.dicts: dict[str, DictObject] = {}
        self.blobs: dict[str, bytes] = {}
        self.mounts: dict[str, dict[str, api_pb2.MountFile]] = {}
        self.images: dict[str, ImageBuild] = {}
        self.image_keys: dict[str, str] = {}
        self.sandboxes: dict[str, SandboxRecord] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- plumbing -------------------------------------------------------------------------------

    def attach(self, server: Server) -> None:
        """Check credentials (and the auth token of the sandbox RPCs) before every handler."""

        async def on_request(event: RecvRequest) -> None:
            method = event.method_name.rsplit("/", 1)[-1]
            self.calls.append(method)
            metadata = event.metadata
            if (metadata.get("x-modal-token-id"), metadata.get("x-modal-token-secret")) != (
                    self.token_id, self._token_secret):
                raise GRPCError(Status.UNAUTHENTICATED, "Token ID or secret is invalid: run `modal setup`")
            if method.startswith("Sandbox") and not self._valid_jwt(str(metadata.get("x-modal-auth-token", ""))):
                raise GRPCError(Status.UNAUTHENTICATED, f"{method}: missing or expired x-modal-auth-token")

        listen(server, RecvRequest, on_request)

    def _jwt(self) -> str:
        return sign_jwt(self._jwt_key, {"exp": int(time.time()) + TOKEN_LIFETIME_SECONDS})

    def _valid_jwt(self, token: str) -> bool:
        return verified_claims(self._jwt_key, token) is not None

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, held until done (the loop keeps only weak references to tasks)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _named(table: dict[str, Any], name: str, creation: int, kind: str,
               make: Callable[[], Any]) -> Any:
        """Modal's get-or-create: found, created if asked (replaced if asked), or NOT_FOUND / ALREADY_EXISTS."""
        found = table.get(name)
        if creation == OVERWRITE:
            found = table[name] = make()
        if found is not None and creation == FAIL_IF_EXISTS:
            raise GRPCError(Status.ALREADY_EXISTS, f"{kind} '{name}' already exists")
        if found is None:
            if creation not in (CREATE_IF_MISSING, FAIL_IF_EXISTS):
                raise GRPCError(Status.NOT_FOUND, f"{kind} '{name}' not found")
            found = table[name] = make()
        return found

    # --- client, app, environment ---------------------------------------------------------------

    async def ClientHello(self, stream: Stream[empty_pb2.Empty, api_pb2.ClientHelloResponse]) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse(image_builder_version=BUILDER_VERSION))

    async def AuthTokenGet(self, stream: Stream[api_pb2.AuthTokenGetRequest, api_pb2.AuthTokenGetResponse]) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=self._jwt()))

    async def EnvironmentGetOrCreate(self, stream: Stream[api_pb2.EnvironmentGetOrCreateRequest,
                                                          api_pb2.EnvironmentGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.deployment_name not in ("", "main"):
            raise GRPCError(Status.NOT_FOUND, f"Environment '{request.deployment_name}' not found")
        settings = api_pb2.EnvironmentSettings(image_builder_version=BUILDER_VERSION, webhook_suffix="modal.run")
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(
            environment_id="en-standin", metadata=api_pb2.EnvironmentMetadata(name="main", settings=settings)))

    async def AppGetOrCreate(self, stream: Stream[api_pb2.AppGetOrCreateRequest,
                                                  api_pb2.AppGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        app = self._named(self.apps, request.app_name, request.object_creation_type, "App",
                          lambda: NamedObject(new_id("ap"), request.app_name))
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app.object_id))

    # --- secrets, volumes, dicts ----------------------------------------------------------------

    async def SecretGetOrCreate(self, stream: Stream[api_pb2.SecretGetOrCreateRequest,
                                                     api_pb2.SecretGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        env = dict(request.env_dict)
        if not request.deployment_name:  # Secret.from_dict: an ephemeral secret, inline
            secret = SecretObject(new_id("st"), "", env)
            self.secrets[secret.object_id] = secret
        else:
            secret = self._named(self.secrets, request.deployment_name, request.object_creation_type, "Secret",
                                 lambda: SecretObject(new_id("st"), request.deployment_name, env))
        missing = [key for key in request.required_keys if key not in secret.env]
        if missing:
            raise GRPCError(Status.NOT_FOUND, f"Secret is missing key(s): {', '.join(missing)}")
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=secret.object_id))

    def secret_by_id(self, secret_id: str) -> SecretObject:
        for secret in self.secrets.values():
            if secret.object_id == secret_id:
                return secret
        raise GRPCError(Status.NOT_FOUND, f"Secret {secret_id} not found")

    async def VolumeGetOrCreate(self, stream: Stream[api_pb2.VolumeGetOrCreateRequest,
                                                     api_pb2.VolumeGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None

        def make() -> VolumeObject:
            volume_id = new_id("vo")
            path = self.root / "volumes" / volume_id
            path.mkdir(parents=True)
            path.chmod(0o777)  # a Modal Volume is writable by whichever user the image runs as
            return VolumeObject(volume_id, request.deployment_name, path)

        volume = self._named(self.volumes, request.deployment_name, request.object_creation_type, "Volume", make)
        version = api_pb2.VOLUME_FS_VERSION_V2
        await stream.send_message(api_pb2.VolumeGetOrCreateResponse(
            volume_id=volume.object_id, version=version, metadata=api_pb2.VolumeMetadata(version=version)))

    async def VolumeDelete(self, stream: Stream[api_pb2.VolumeDeleteRequest, empty_pb2.Empty]) -> None:
        request = await stream.recv_message()
        assert request is not None
        volume = self._volume_by_id(request.volume_id)
        del self.volumes[volume.name]
        await asyncio.to_thread(shutil.rmtree, volume.path)
        await stream.send_message(empty_pb2.Empty())

    def _volume_by_id(self, volume_id: str) -> VolumeObject:
        for volume in self.volumes.values():
            if volume.object_id == volume_id:
                return volume
        raise GRPCError(Status.NOT_FOUND, f"Volume {volume_id} not found")

    async def DictGetOrCreate(self, stream: Stream[api_pb2.DictGetOrCreateRequest,
                                                   api_pb2.DictGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        found = self._named(self.dicts, request.deployment_name, request.object_creation_type, "Dict",
                            lambda: DictObject(new_id("di"), request.deployment_name))
        await stream.send_message(api_pb2.DictGetOrCreateResponse(dict_id=found.object_id))

    def _dict_by_id(self, dict_id: str) -> DictObject:
        for found in self.dicts.values():
            if found.object_id == dict_id:
                return found
        raise GRPCError(Status.NOT_FOUND, f"Dict {dict_id} not found")

    async def DictUpdate(self, stream: Stream[api_pb2.DictUpdateRequest, api_pb2.DictUpdateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        entries = self._dict_by_id(request.dict_id).entries
        created = not (request.if_not_exists and any(u.key in entries for u in request.updates))
        if created:
            entries.update({u.key: u.value for u in request.updates})
        await stream.send_message(api_pb2.DictUpdateResponse(created=created))

    async def DictGet(self, stream: Stream[api_pb2.DictGetRequest, api_pb2.DictGetResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        entries = self._dict_by_id(request.dict_id).entries
        value = entries.get(request.key)
        await stream.send_message(api_pb2.DictGetResponse(found=value is not None, value=value or b""))

    async def DictDelete(self, stream: Stream[api_pb2.DictDeleteRequest, empty_pb2.Empty]) -> None:
        request = await stream.recv_message()
        assert request is not None
        del self.dicts[self._dict_by_id(request.dict_id).name]
        await stream.send_message(empty_pb2.Empty())

    # --- mounts and images ----------------------------------------------------------------------

    async def MountBatchedCheckExistence(self, stream: Stream[api_pb2.MountBatchedCheckExistenceRequest,
                                                              api_pb2.MountBatchedCheckExistenceResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        missing = [sha for sha in request.sha256_hex_hashes if sha not in self.blobs]
        await stream.send_message(api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing))

    async def MountPutFile(self, stream: Stream[api_pb2.MountPutFileRequest, api_pb2.MountPutFileResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.WhichOneof("data_oneof") == "data":
            if hashlib.sha256(request.data).hexdigest() != request.sha256_hex:
                raise GRPCError(Status.INVALID_ARGUMENT, "data does not match sha256_hex")
            self.blobs[request.sha256_hex] = request.data
        elif request.WhichOneof("data_oneof") is not None:
            raise GRPCError(Status.UNIMPLEMENTED, "stand-in: MountPutFile with a blob (files above 4 MiB)")
        await stream.send_message(api_pb2.MountPutFileResponse(exists=request.sha256_hex in self.blobs))

    async def MountGetOrCreate(self, stream: Stream[api_pb2.MountGetOrCreateRequest,
                                                    api_pb2.MountGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.deployment_name:
            raise GRPCError(Status.UNIMPLEMENTED, "stand-in: named mounts")
        missing = [f.filename for f in request.files if f.sha256_hex not in self.blobs]
        if missing:
            raise GRPCError(Status.FAILED_PRECONDITION, f"files not uploaded: {missing[:5]}")
        # Content-addressed, so that an unchanged build context gives an unchanged image definition.
        listing = sorted((f.filename, f.sha256_hex, f.mode) for f in request.files)
        mount_id = "mo-" + hashlib.sha256(repr(listing).encode()).hexdigest()[:24]
        self.mounts[mount_id] = {f.filename: f for f in request.files}
        await stream.send_message(api_pb2.MountGetOrCreateResponse(
            mount_id=mount_id, handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex=mount_id)))

    async def ImageGetOrCreate(self, stream: Stream[api_pb2.ImageGetOrCreateRequest,
                                                    api_pb2.ImageGetOrCreateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        image = request.image
        if image.base_images or image.build_function.definition or image.context_files or image.secret_ids:
            raise GRPCError(Status.UNIMPLEMENTED, "stand-in: images other than a single-stage Dockerfile")
        key = hashlib.sha256(image.SerializeToString(deterministic=True) + request.builder_version.encode()).hexdigest()
        image_id = self.image_keys.get(key)
        build = self.images.get(image_id) if image_id else None
        if build is None or request.force_build or (build.done.is_set() and build.result is not None
                                                    and build.result.status != SUCCESS):
            build = ImageBuild(new_id("im"), f"modal-standin/{self.engine.instance}-{key[:16]}")
            self.images[build.image_id] = build
            self.image_keys[key] = build.image_id
            self.spawn(self._build(build, image))
        response = api_pb2.ImageGetOrCreateResponse(image_id=build.image_id)
        if build.done.is_set() and build.result is not None:
            response.result.CopyFrom(build.result)
        await stream.send_message(response)

    async def _build(self, build: ImageBuild, image: api_pb2.Image) -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="modal-build-", dir=self.root) as context:
                for path, mount_file in self.mounts.get(image.context_mount_id, {}).items():
                    target = Path(context) / PurePosixPath(path).relative_to("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(self.blobs[mount_file.sha256_hex])
                    target.chmod(mount_file.mode & 0o777 or 0o644)
                ok, output = await asyncio.to_thread(self.engine.build, build.tag, "\n".join(image.dockerfile_commands),
                                                     Path(context), dict(image.build_args))
            build.result = api_pb2.GenericResult(status=SUCCESS) if ok else api_pb2.GenericResult(
                status=FAILURE, exception=f"docker build failed:\n{output[-3000:]}")
        except Exception as exc:  # noqa: BLE001 - a failed build is an answer to the client, not a crash
            build.result = api_pb2.GenericResult(status=FAILURE, exception=f"{type(exc).__name__}: {exc}")
        build.done.set()

    async def ImageJoinStreaming(self, stream: Stream[api_pb2.ImageJoinStreamingRequest,
                                                      api_pb2.ImageJoinStreamingResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        build = self.images.get(request.image_id)
        if build is None:
            raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} not found")
        try:
            await asyncio.wait_for(build.done.wait(), request.timeout or None)
        except TimeoutError:
            await stream.send_message(api_pb2.ImageJoinStreamingResponse(eof=True))  # the client asks again
            return
        assert build.result is not None
        await stream.send_message(api_pb2.ImageJoinStreamingResponse(
            result=build.result, eof=True, metadata=api_pb2.ImageMetadata(image_builder_version=BUILDER_VERSION)))

    # --- sandboxes ------------------------------------------------------------------------------

    async def SandboxCreateV2(self, stream: Stream[api_pb2.SandboxCreateV2Request,
                                                   api_pb2.SandboxCreateV2Response]) -> None:
        request = await stream.recv_message()
        assert request is not None
        definition = request.definition
        if request.app_id not in {app.object_id for app in self.apps.values()}:
            raise GRPCError(Status.NOT_FOUND, f"App {request.app_id} not found")
        build = self.images.get(definition.image_id)
        if build is None or build.result is None or build.result.status != SUCCESS:
            raise GRPCError(Status.FAILED_PRECONDITION, f"Image {definition.image_id} is not built")
        ports = list(definition.open_ports.ports)
        if len(ports) != 1 or ports[0].unencrypted:
            raise GRPCError(Status.UNIMPLEMENTED, "stand-in: exactly one encrypted port per sandbox")
        if definition.name and any(s.running and s.app_id == request.app_id and s.name == definition.name
                                   for s in self.sandboxes.values()):
            raise GRPCError(Status.ALREADY_EXISTS, f"Sandbox with name '{definition.name}' already exists")
        env: dict[str, str] = {}
        for secret_id in definition.secret_ids:
            env.update(self.secret_by_id(secret_id).env)
        for source in request.secret_sources:
            env.update(self.secret_by_id(source.secret_id).env if source.secret_id else dict(source.env.contents))
        binds = {self._volume_by_id(m.volume_id).path: m.mount_path for m in definition.volume_mounts}

        sandbox_id = new_id("sb")
        server_port = _free_port()
        env.update({"HOST": "127.0.0.1", "PORT": str(server_port)})
        container = f"modal-standin-{sandbox_id}"
        resources = definition.resources
        await asyncio.to_thread(self.engine.run, container, build.tag, list(definition.entrypoint_args), env, binds,
                                definition.workdir, resources.memory_mb_max * 2**20 or None,
                                resources.milli_cpu_max * 1_000_000 or None)
        tunnel = await Tunnel.open(self.ca, server_port)
        record = SandboxRecord(sandbox_id, request.app_id, definition.name, {t.tag_name: t.tag_value for t in request.tags},
                               container, time.time(), definition.timeout_secs, definition.idle_timeout_secs,
                               definition.image_id, ports[0].port, tunnel)
        self.sandboxes[sandbox_id] = record
        if definition.timeout_secs:
            record.timer = asyncio.get_running_loop().call_later(
                definition.timeout_secs, lambda: self.spawn(self._terminate(record, timed_out=True)))
        await stream.send_message(api_pb2.SandboxCreateV2Response(
            sandbox_id=sandbox_id, task_id=record.task_id, tunnels=[self._tunnel_data(record)],
            metadata=api_pb2.SandboxHandleMetadata(app_id=request.app_id)))

    def _tunnel_data(self, record: SandboxRecord) -> api_pb2.TunnelData:
        return api_pb2.TunnelData(host="127.0.0.1", port=record.tunnel.port, container_port=record.container_port)

    async def _refresh(self, record: SandboxRecord) -> None:
        """Notice a container that exited on its own (crashed, killed)."""
        if not record.running:
            return
        code = await asyncio.to_thread(self.engine.exit_code, record.container)
        if code is not None and record.running:
            record.result = api_pb2.GenericResult(status=SUCCESS if code == 0 else FAILURE, exitcode=code,
                                                  exception="" if code == 0 else f"exited with code {code}")
            await record.tunnel.close()
            record.output = await asyncio.to_thread(self.engine.logs, record.container)
            await asyncio.to_thread(self.engine.stop, record.container, 0)

    async def _terminate(self, record: SandboxRecord, timed_out: bool = False) -> None:
        await self._refresh(record)
        if not record.running:
            return
        record.result = api_pb2.GenericResult(
            status=api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT if timed_out else TERMINATED, exitcode=137)
        if record.timer is not None:
            record.timer.cancel()
        await record.tunnel.close()
        await asyncio.to_thread(self.engine.stop, record.container, STOP_GRACE_SECONDS)

    def _sandbox(self, sandbox_id: str) -> SandboxRecord:
        record = self.sandboxes.get(sandbox_id)
        if record is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return record

    async def SandboxWaitV2(self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        record = self._sandbox(request.sandbox_id)
        deadline = time.monotonic() + request.timeout
        await self._refresh(record)
        while record.running and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await self._refresh(record)
        response = api_pb2.SandboxWaitResponse(metadata=api_pb2.SandboxHandleMetadata(app_id=record.app_id))
        if record.result is not None:
            response.result.CopyFrom(record.result)
        await stream.send_message(response)

    async def SandboxTerminateV2(self, stream: Stream[api_pb2.SandboxTerminateRequest,
                                                      api_pb2.SandboxTerminateResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await self._terminate(self._sandbox(request.sandbox_id))
        await stream.send_message(api_pb2.SandboxTerminateResponse())

    async def SandboxGetTunnelsV2(self, stream: Stream[api_pb2.SandboxGetTunnelsRequest,
                                                       api_pb2.SandboxGetTunnelsResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        record = self._sandbox(request.sandbox_id)
        await self._refresh(record)
        response = api_pb2.SandboxGetTunnelsResponse()
        if record.running:
            response.result.status = SUCCESS
            response.tunnels.append(self._tunnel_data(record))
        else:
            assert record.result is not None
            response.result.CopyFrom(record.result)
        await stream.send_message(response)

    async def SandboxListV2(self, stream: Stream[api_pb2.SandboxListRequest, api_pb2.SandboxListResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        wanted = {t.tag_name: t.tag_value for t in request.tags}
        for record in list(self.sandboxes.values()):
            await self._refresh(record)
        found = sorted((s for s in self.sandboxes.values()
                        if (s.running or request.include_finished)
                        and (not request.app_id or s.app_id == request.app_id)
                        and wanted.items() <= s.tags.items()
                        and (not request.before_timestamp or s.created_at < request.before_timestamp)),
                       key=lambda s: s.created_at, reverse=True)
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=[api_pb2.SandboxInfo(
            id=s.sandbox_id, created_at=s.created_at, app_id=s.app_id, name=s.name, image_id=s.image_id,
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in s.tags.items()],
            timeout_secs=s.timeout_secs, idle_timeout_secs=s.idle_timeout_secs,
            task_info=api_pb2.TaskInfo(id=s.task_id, result=s.result),
            metadata=api_pb2.SandboxHandleMetadata(app_id=s.app_id)) for s in found[:100]]))

    async def SandboxTagsGetV2(self, stream: Stream[api_pb2.SandboxTagsGetRequest,
                                                    api_pb2.SandboxTagsGetResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        record = self._sandbox(request.sandbox_id)
        await stream.send_message(api_pb2.SandboxTagsGetResponse(
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in record.tags.items()]))

    async def SandboxTagsSetV2(self, stream: Stream[api_pb2.SandboxTagsSetRequest, empty_pb2.Empty]) -> None:
        request = await stream.recv_message()
        assert request is not None
        record = self._sandbox(request.sandbox_id)
        if not record.running:
            raise GRPCError(Status.FAILED_PRECONDITION, f"Sandbox {record.sandbox_id} has finished")
        record.tags = {t.tag_name: t.tag_value for t in request.tags}
        await stream.send_message(empty_pb2.Empty())

    async def SandboxGetTaskIdV2(self, stream: Stream[api_pb2.SandboxGetTaskIdRequest,
                                                      api_pb2.SandboxGetTaskIdResponse]) -> None:
        """The task of a running sandbox; a finished one's result instead (the client raises on it)."""
        request = await stream.recv_message()
        assert request is not None
        if request.wait_until_ready:
            raise GRPCError(Status.UNIMPLEMENTED, "stand-in: readiness probes (wait_until_ready)")
        record = self._sandbox(request.sandbox_id)
        await self._refresh(record)
        response = api_pb2.SandboxGetTaskIdResponse()
        if record.running:
            response.task_id = record.task_id
        else:
            assert record.result is not None
            response.task_result.CopyFrom(record.result)
        await stream.send_message(response)

    async def SandboxGetCommandRouterAccess(self, stream: Stream[api_pb2.SandboxGetCommandRouterAccessRequest,
                                                                 api_pb2.SandboxGetCommandRouterAccessResponse]) -> None:
        """Where the task's command router listens, and a short-lived token for that task alone."""
        request = await stream.recv_message()
        assert request is not None
        if request.WhichOneof("target") == "task_id":
            record = next((s for s in self.sandboxes.values() if s.task_id == request.task_id), None)
            if record is None:
                raise GRPCError(Status.NOT_FOUND, f"Task {request.task_id} not found")
        else:
            record = self._sandbox(request.sandbox_id)
        await self._refresh(record)
        if not record.running:
            raise GRPCError(Status.FAILED_PRECONDITION, f"Sandbox {record.sandbox_id} has finished")
        jwt = sign_jwt(self.router_key, {"exp": int(time.time()) + TOKEN_LIFETIME_SECONDS, "task_id": record.task_id})
        await stream.send_message(api_pb2.SandboxGetCommandRouterAccessResponse(
            jwt=jwt, url=self.router_url, worker_ipv4_address="127.0.0.1"))

    # --- the stand-in's own --------------------------------------------------------------------

    async def running_task(self, task_id: str) -> SandboxRecord | None:
        """The sandbox of a task, if it is running (a crashed container is noticed here)."""
        record = next((s for s in self.sandboxes.values() if s.task_id == task_id), None)
        if record is not None:
            await self._refresh(record)
        return record if record is not None and record.running else None

    def container_of(self, sandbox_id: str) -> str:
        return self._sandbox(sandbox_id).container

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for record in self.sandboxes.values():
            if record.timer is not None:
                record.timer.cancel()
            await record.tunnel.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Recording(Protocol):
    """Where a service of the stand-in records the calls it cannot answer and the handlers that broke."""

    unimplemented: list[str]
    errors: list[str]


def unimplemented_handler(name: str) -> Callable[..., Coroutine[Any, Any, None]]:
    async def handler(self: Recording, stream: Stream[Any, Any]) -> None:
        self.unimplemented.append(name)
        raise GRPCError(Status.UNIMPLEMENTED, f"the Modal stand-in does not implement {name}")

    handler.__name__ = name
    return handler


def recorded_errors(name: str, implemented: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Coroutine[Any, Any, None]]:
    async def handler(self: Recording, stream: Stream[Any, Any]) -> None:
        try:
            await implemented(self, stream)
        except GRPCError:
            raise
        except Exception as exc:
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            raise

    handler.__name__ = name
    return handler


def failing_loudly(implementation: type[Any], service: type[Any]) -> type[Any]:
    """``implementation`` of ``service`` with every RPC it does not implement answering UNIMPLEMENTED,
    and every unimplemented call and broken handler recorded."""
    abstract: frozenset[str] = getattr(implementation, "__abstractmethods__", frozenset())
    handlers = {name: unimplemented_handler(name) if name in abstract else recorded_errors(name, getattr(implementation, name))
                for name in service.__abstractmethods__}
    return type(f"StandIn{implementation.__name__}", (implementation,), handlers)


StandInService: type[ControlPlane] = failing_loudly(ControlPlane, api_grpc.ModalClientBase)
"""The control plane, failing loudly."""
