"""Modal's task command router for the stand-in's sandboxes: the service ``Sandbox.exec`` talks to.

modal==1.6.4 runs a command in a sandbox without the control plane: it asks the control
plane for the task's router (``SandboxGetCommandRouterAccess``: an address and a JWT for
that task alone), then calls the router directly, over TLS (the client skips certificate
checks when its control plane is on localhost; the certificate comes from the stand-in's
test CA all the same). ``TaskExecStart`` starts the command, ``TaskExecStdioRead`` streams
its stdout or stderr from an offset, ``TaskExecWait`` waits for its exit status.

Semantics kept: every call carries the task's token (UNAUTHENTICATED without a valid one,
PERMISSION_DENIED with another task's), NOT_FOUND for a task that is not running or an
exec the router does not know, ``exec_id`` as the idempotency key of a start, the secret
sources (inline ``env`` included) as the command's environment on top of the sandbox's,
output kept only for the streams piped and readable from any offset, ``timeout_secs``
after which the command is killed (its status is then the signal), and commands that end
with their sandbox. Every other RPC of the router answers UNIMPLEMENTED and is recorded
with the control plane's (:func:`~tests.standins.modal.control_plane.failing_loudly`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from docker.errors import APIError, DockerException
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream
from modal_proto import task_command_router_pb2 as sr_pb2
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from tests.standins.modal.control_plane import ControlPlane, SandboxRecord, failing_loudly, verified_claims

CHUNK_BYTES = 64 * 1024
STDIO = {sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDOUT: 0, sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR: 1}
"""The router's file descriptors, as indexes into :attr:`Exec.output`."""


@dataclass
class Exec:
    """One command started in a sandbox, and what the router has seen of it."""

    docker_id: str
    piped: tuple[bool, bool]
    """Whether stdout, stderr are kept for the client (the others are dropped, as ``DEVNULL``)."""
    output: tuple[bytearray, bytearray] = field(default_factory=lambda: (bytearray(), bytearray()))
    status: sr_pb2.TaskExecWaitResponse | None = None
    killed: bool = False
    timer: asyncio.TimerHandle | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) whenever output arrives or the command ends."""

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def add(self, stdout: bytes | None, stderr: bytes | None) -> None:
        for index, data in enumerate((stdout, stderr)):
            if data and self.piped[index]:
                self.output[index].extend(data)
        self._notify()

    def end(self, exit_code: int | None) -> None:
        """It ended: with its code, or by a signal if the router killed it or it has no code (killed with its sandbox)."""
        if self.timer is not None:
            self.timer.cancel()
        if self.killed or exit_code is None:
            self.status = sr_pb2.TaskExecWaitResponse(signal=signal.SIGKILL)
        else:
            self.status = sr_pb2.TaskExecWaitResponse(code=exit_code)
        self._notify()


class CommandRouter(TaskCommandRouterBase):
    """The implemented RPCs of the router, for every task of one control plane."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.unimplemented = plane.unimplemented
        self.errors = plane.errors
        self.execs: dict[tuple[str, str], Exec] = {}

    def attach(self, server: Server) -> None:
        """Check the router token before every handler (which task it is for, each handler checks)."""

        async def on_request(event: RecvRequest) -> None:
            self.plane.calls.append(event.method_name.rsplit("/", 1)[-1])
            if _claims(self.plane, str(event.metadata.get("authorization", ""))) is None:
                raise GRPCError(Status.UNAUTHENTICATED, "missing or expired command router token")

        listen(server, RecvRequest, on_request)

    async def _task(self, stream: Stream[Any, Any], task_id: str) -> SandboxRecord:
        """The running sandbox of ``task_id``, if the request's token is for that task."""
        assert stream.metadata is not None
        claims = _claims(self.plane, str(stream.metadata.get("authorization", "")))
        if claims is None:
            raise GRPCError(Status.UNAUTHENTICATED, "missing or expired command router token")
        if claims.get("task_id") != task_id:
            raise GRPCError(Status.PERMISSION_DENIED, f"the token is not for task {task_id}")
        record = await self.plane.running_task(task_id)
        if record is None:
            raise GRPCError(Status.NOT_FOUND, f"Task {task_id} not found")
        return record

    def _exec(self, task_id: str, exec_id: str) -> Exec:
        found = self.execs.get((task_id, exec_id))
        if found is None:
            raise GRPCError(Status.NOT_FOUND, f"Exec {exec_id} not found")
        return found

    async def TaskExecStart(self, stream: Stream[sr_pb2.TaskExecStartRequest, sr_pb2.TaskExecStartResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        record = await self._task(stream, request.task_id)
        unsupported = [name for name, given in (("pty", request.HasField("pty_info")), ("container_id", request.container_id),
                                                ("secret_ids", request.secret_ids), ("env", request.env)) if given]
        if unsupported:
            raise GRPCError(Status.UNIMPLEMENTED, f"stand-in: exec with {', '.join(unsupported)}")
        if (request.task_id, request.exec_id) not in self.execs:  # a retried start starts nothing
            env: dict[str, str] = {}
            for source in request.secret_sources:
                env.update(self.plane.secret_by_id(source.secret_id).env if source.secret_id else source.env.contents)
            await self._start(record, request, env)
        await stream.send_message(sr_pb2.TaskExecStartResponse())

    async def _start(self, record: SandboxRecord, request: sr_pb2.TaskExecStartRequest, env: dict[str, str]) -> None:
        workdir = request.workdir if request.HasField("workdir") else None
        try:
            docker_id, output = await asyncio.to_thread(self.plane.engine.exec_start, record.container,
                                                        list(request.command_args), env, workdir)
        except APIError as exc:  # 404 / 409: the container ended meanwhile
            status = Status.NOT_FOUND if exc.status_code in (404, 409) else Status.INVALID_ARGUMENT
            raise GRPCError(status, f"cannot start the command: {exc.explanation}") from None
        execution = Exec(docker_id, (request.stdout_config == sr_pb2.TASK_EXEC_STDOUT_CONFIG_PIPE,
                                     request.stderr_config == sr_pb2.TASK_EXEC_STDERR_CONFIG_PIPE))
        self.execs[(request.task_id, request.exec_id)] = execution
        loop = asyncio.get_running_loop()
        # docker-py streams block: one thread per command, for as long as it runs (the default
        # executor's few threads would be taken by long-running commands).
        threading.Thread(target=self._pump, args=(execution, output, loop), name=f"exec-{request.exec_id[:8]}",
                         daemon=True).start()
        if request.HasField("timeout_secs") and request.timeout_secs > 0:
            execution.timer = loop.call_later(request.timeout_secs, lambda: self.plane.spawn(self._kill(execution)))

    def _pump(self, execution: Exec, output: Iterator[tuple[bytes | None, bytes | None]],
              loop: asyncio.AbstractEventLoop) -> None:
        """In the command's thread: hand its output to the loop as it comes, then its exit code."""
        exit_code: int | None = None
        try:
            for stdout, stderr in output:
                loop.call_soon_threadsafe(execution.add, stdout, stderr)
            running, exit_code = self.plane.engine.exec_state(execution.docker_id)
            while running:  # the streams close a moment before Docker records the exit
                time.sleep(0.02)
                running, exit_code = self.plane.engine.exec_state(execution.docker_id)
        except (DockerException, OSError):  # the stand-in stopped and closed its engine client: killed with it
            pass
        with contextlib.suppress(RuntimeError):  # the stand-in's loop stopped meanwhile
            loop.call_soon_threadsafe(execution.end, exit_code)

    async def _kill(self, execution: Exec) -> None:
        if execution.status is None:
            execution.killed = True
            try:
                await asyncio.to_thread(self.plane.engine.exec_kill, execution.docker_id)
            except OSError as exc:  # e.g. tests not run as root: the failure is the test's
                self.errors.append(f"killing a timed-out exec: {exc}")

    async def TaskExecStdioRead(self, stream: Stream[sr_pb2.TaskExecStdioReadRequest,
                                                     sr_pb2.TaskExecStdioReadResponse]) -> None:
        """The stream's output from ``offset``, as it comes, until the command has ended and all is sent."""
        request = await stream.recv_message()
        assert request is not None
        await self._task(stream, request.task_id)
        execution = self._exec(request.task_id, request.exec_id)
        index = STDIO.get(request.file_descriptor)
        if index is None:
            raise GRPCError(Status.INVALID_ARGUMENT, f"unknown file descriptor {request.file_descriptor}")
        if not execution.piped[index]:
            raise GRPCError(Status.FAILED_PRECONDITION, f"that stream of exec {request.exec_id} is not piped")
        offset = request.offset
        while True:
            changed, data = execution.changed, execution.output[index]
            if offset < len(data):
                chunk = bytes(data[offset:offset + CHUNK_BYTES])
                await stream.send_message(sr_pb2.TaskExecStdioReadResponse(data=chunk))
                offset += len(chunk)
            elif execution.status is not None:
                return
            else:
                await changed.wait()

    async def TaskExecWait(self, stream: Stream[sr_pb2.TaskExecWaitRequest, sr_pb2.TaskExecWaitResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await self._task(stream, request.task_id)
        execution = self._exec(request.task_id, request.exec_id)
        while execution.status is None:
            await execution.changed.wait()
        await stream.send_message(execution.status)

    def close(self) -> None:
        for execution in self.execs.values():
            if execution.timer is not None:
                execution.timer.cancel()


def _claims(plane: ControlPlane, authorization: str) -> dict[str, object] | None:
    scheme, _, token = authorization.partition(" ")
    return verified_claims(plane.router_key, token) if scheme == "Bearer" else None


StandInRouter: type[CommandRouter] = failing_loudly(CommandRouter, TaskCommandRouterBase)
"""The command router, failing loudly."""
