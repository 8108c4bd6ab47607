"""Sandboxes as server processes on this machine: the embedded default. Needs only
Python and Linux's ``/proc``; no root, no Docker.

Everything lives under ``data_dir``, which every gateway replica on this machine
shares::

    volumes/<volume>/              a sandbox's AGENT_DATA_DIR and HOME: its conversations
    sandboxes/<sandbox_id>.json    its record: sandbox_id, volume, session_id, tenant,
                                   pid, port, created_at, installation
    sandboxes/<sandbox_id>.log     its server's output
    sandboxes/.lock                held while a warm sandbox is claimed

Each sandbox is ``python -m hosting.server`` (this interpreter, this source tree)
on 127.0.0.1 and a port of its own, started through ``setpriv --pdeathsig KILL``
so that the kernel kills it when the gateway dies, even by SIGKILL. The kernel
sends that signal when the *thread* that started it exits: start sandboxes from
the event loop's thread, not from a short-lived worker thread.

Its environment is an allowlist: the spec's server environment, ``PATH``,
``LANG`` and ``LC_ALL`` of the gateway, ``HOME`` (the volume) and a tag,
``AGENT_SANDBOX_ID``. Nothing else of the gateway's environment (its admin
token, its cloud credentials) reaches a process that runs the model's tools.

Commands run in a sandbox (:meth:`LocalBackend.run_command`, ``start_command``) are
processes in its volume, with the allowlisted environment, the sandbox's tag, this
interpreter first on ``PATH`` and this source tree on ``PYTHONPATH``; deleting the
sandbox kills every process that carries its tag.

The records are the only state, so any replica can list, claim and delete any
sandbox. A record counts only while ``/proc/<pid>`` shows that sandbox's server
(its tag in ``environ``, ``hosting.server`` in ``cmdline``): a pid the kernel has
given to another process is never mistaken for a sandbox, nor signalled.
"""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hosting.sandboxes._shared import BIND_ATTEMPTS, await_serving, finish_or_delete, free_loopback_port, tail
from hosting.sandboxes.base import (
    CommandResult,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
    check_sandbox_id,
    check_volume,
)

logger = logging.getLogger("hosting.sandboxes.local")

SANDBOX_TAG = "AGENT_SANDBOX_ID"
"""The environment variable that marks a process as a sandbox's server."""
INHERITED = ("PATH", "LANG", "LC_ALL")
"""All a sandbox takes from the gateway's own environment."""
SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the ``hosting`` package: ``-m hosting.server`` from there
runs the gateway's own code, installed or not."""


@dataclass(frozen=True)
class _Record:
    sandbox_id: str
    volume: str
    session_id: str | None
    tenant: str | None
    pid: int
    port: int
    created_at: float
    installation: str

    def sandbox(self) -> Sandbox:
        return Sandbox(self.sandbox_id, LocalBackend.name, f"http://127.0.0.1:{self.port}", self.volume,
                       self.session_id, self.tenant, self.created_at, self.pid)


def _is_server_of(pid: int, sandbox_id: str) -> bool:
    """Whether ``pid`` is the running server of ``sandbox_id`` (a zombie has no environ)."""
    proc = Path("/proc", str(pid))
    try:
        environ = (proc / "environ").read_bytes().split(b"\0")
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return False
    return f"{SANDBOX_TAG}={sandbox_id}".encode() in environ and b"hosting.server" in cmdline


def _tagged_pids(sandbox_id: str) -> list[int]:
    """Every process that carries the sandbox's tag: its server, the server's CLIs, its commands."""
    tag = f"{SANDBOX_TAG}={sandbox_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if tag in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone, or another user's
            continue
    return pids


class LocalBackend(SandboxBackend):
    """Server processes on this machine, recorded under ``data_dir`` (see the module doc)."""

    name = "local"

    def __init__(self, data_dir: Path, installation: str = "default", *,
                 start_timeout: float = 60.0, stop_timeout: float = 5.0) -> None:
        root = data_dir.resolve()  # the servers run elsewhere: a relative path would point elsewhere
        self._volumes = root / "volumes"
        self._records = root / "sandboxes"
        self.installation = installation
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._reapers: set[asyncio.Future[int]] = set()
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            logger.warning("setpriv (util-linux) not found: sandboxes will outlive a gateway that is killed")
        self._guard = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Start the server and return once it answers ``/ready`` on its port."""
        try:
            return await finish_or_delete(self._create(spec), self.delete)
        except OSError as exc:  # data_dir not writable, interpreter or setpriv not runnable
            raise SandboxError(f"sandbox {spec.sandbox_id} could not start: {exc}") from exc

    async def _create(self, spec: SandboxSpec) -> Sandbox:
        existing = self._read(spec.sandbox_id)
        if existing is not None and _is_server_of(existing.pid, spec.sandbox_id):
            raise SandboxError(f"sandbox {spec.sandbox_id} exists already")
        volume_dir = self._volumes / spec.volume
        made_volume = not volume_dir.exists()
        volume_dir.mkdir(parents=True, exist_ok=True)
        self._records.mkdir(parents=True, exist_ok=True)
        log_path = self._records / f"{spec.sandbox_id}.log"
        try:
            for _ in range(BIND_ATTEMPTS):
                sandbox = await self._start(spec, volume_dir, free_loopback_port(), log_path)
                if sandbox is not None:
                    return sandbox
            raise SandboxError(f"sandbox {spec.sandbox_id}: its port was taken {BIND_ATTEMPTS} times")
        except BaseException:
            log_path.unlink(missing_ok=True)
            if made_volume:
                shutil.rmtree(volume_dir, ignore_errors=True)
            raise

    async def _start(self, spec: SandboxSpec, volume_dir: Path, port: int, log_path: Path) -> Sandbox | None:
        """One attempt on ``port``: the recorded sandbox, or ``None`` if the port was
        taken. If anything fails, the process is killed."""
        env = {name: os.environ[name] for name in INHERITED if name in os.environ}
        env["HOME"] = str(volume_dir)
        env.update(spec.server_env(host="127.0.0.1", port=port, data_dir=str(volume_dir)))
        env[SANDBOX_TAG] = spec.sandbox_id
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *self._guard, sys.executable, "-m", "hosting.server", cwd=SOURCE_ROOT, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)

        async def exited() -> str | None:
            if process.returncode is None:
                return None
            with log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")

        try:
            if not await await_serving(spec.sandbox_id, f"http://127.0.0.1:{port}", spec.token, exited,
                                       self._start_timeout):
                await process.wait()
                return None
            record = _Record(spec.sandbox_id, spec.volume, spec.session_id, spec.tenant, process.pid, port,
                             time.time(), self.installation)
            self._write(record)
        except BaseException:
            if process.returncode is None:
                process.kill()
            await process.wait()
            raise
        self._children[spec.sandbox_id] = process
        return record.sandbox()

    async def delete(self, sandbox_id: str, *, at_once: bool = False) -> None:
        """SIGTERM (the server drains), SIGKILL after ``stop_timeout`` (or SIGKILL at once); then the record goes."""
        check_sandbox_id(sandbox_id)
        record = self._read(sandbox_id)
        if record is None or record.installation != self.installation:
            return
        if _is_server_of(record.pid, sandbox_id):
            if not at_once:
                self._signal(record, signal.SIGTERM)
            if at_once or not await self._ended(record, self._stop_timeout):
                self._signal(record, signal.SIGKILL)
                if not await self._ended(record, 10.0):
                    raise SandboxError(f"sandbox {sandbox_id} (pid {record.pid}) survived SIGKILL")
        for pid in _tagged_pids(sandbox_id):  # its commands, and CLIs its server left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._forget(record)

    def _signal(self, record: _Record, sig: signal.Signals) -> None:
        if _is_server_of(record.pid, record.sandbox_id):
            try:
                os.kill(record.pid, sig)
            except ProcessLookupError:
                pass

    async def _ended(self, record: _Record, timeout: float) -> bool:
        """Wait for the server to exit; a child of this gateway is also reaped."""
        child = self._children.get(record.sandbox_id)
        if child is not None:
            try:
                await asyncio.wait_for(child.wait(), timeout)
            except TimeoutError:
                return False
            return True
        deadline = time.monotonic() + timeout
        while _is_server_of(record.pid, record.sandbox_id):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def run_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> CommandResult:
        volume_dir, command_env = self._command_env(sandbox_id, env)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._guard, *argv, cwd=volume_dir, env=command_env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} could not start: {exc}") from exc
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} did not end within {timeout:.0f} s") from None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return CommandResult(process.returncode if process.returncode is not None else -1,
                             output.decode(errors="replace"))

    async def start_command(self, sandbox_id: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Started through ``setpriv --pdeathsig KILL`` like the servers, in a session of its
        own; the child is reaped by a task of this backend so that it leaves no zombie."""
        volume_dir, command_env = self._command_env(sandbox_id, env)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._guard, *argv, cwd=volume_dir, env=command_env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise SandboxError(f"sandbox {sandbox_id}: {argv[0]} could not start: {exc}") from exc
        reaper = asyncio.ensure_future(process.wait())
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    def _command_env(self, sandbox_id: str, extra: Mapping[str, str] | None) -> tuple[Path, dict[str, str]]:
        """The data dir of a running sandbox and the environment of a command in it."""
        check_sandbox_id(sandbox_id)
        record = self._read(sandbox_id)
        if record is None or record.installation != self.installation or not _is_server_of(record.pid, sandbox_id):
            raise SandboxError(f"sandbox {sandbox_id} is not running")
        volume_dir = self._volumes / record.volume
        env = {name: os.environ[name] for name in INHERITED if name in os.environ}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
        env.update(extra or {})
        env.update({"HOME": str(volume_dir), "AGENT_DATA_DIR": str(volume_dir), "PYTHONPATH": str(SOURCE_ROOT),
                    SANDBOX_TAG: sandbox_id})
        return volume_dir, env

    async def delete_volume(self, volume: str) -> None:
        check_volume(volume)
        users = [r.sandbox_id for r in self._live_records() if r.volume == volume]
        if users:
            raise SandboxError(f"volume {volume} is in use by sandbox {', '.join(users)}")
        try:
            await asyncio.to_thread(shutil.rmtree, self._volumes / volume)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SandboxError(f"could not remove volume {volume}: {exc}") from exc

    async def list(self) -> list[Sandbox]:
        return [r.sandbox() for r in self._live_records() if r.installation == self.installation]

    async def exists(self, sandbox_id: str) -> bool:
        record = self._read(sandbox_id)
        return (record is not None and record.installation == self.installation
                and _is_server_of(record.pid, sandbox_id))

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        """Record the session on the sandbox, under a lock that every replica takes."""
        return await asyncio.to_thread(self._claim, sandbox.sandbox_id, session_id, tenant)

    def _claim(self, sandbox_id: str, session_id: str, tenant: str) -> Sandbox | None:
        self._records.mkdir(parents=True, exist_ok=True)
        with (self._records / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self._read(sandbox_id)
            if (record is None or record.installation != self.installation or record.session_id is not None
                    or not _is_server_of(record.pid, sandbox_id)):
                return None
            claimed = replace(record, session_id=session_id, tenant=tenant)
            self._write(claimed)
            return claimed.sandbox()

    def _live_records(self) -> builtins.list[_Record]:
        """Every installation's records whose server runs; the others are removed."""
        live = []
        for path in sorted(self._records.glob("*.json")):
            record = self._read(path.stem)
            if record is None:
                continue
            if _is_server_of(record.pid, record.sandbox_id):
                live.append(record)
            elif record.installation == self.installation:
                self._forget(record, crashed=True)
        return live

    def _read(self, sandbox_id: str) -> _Record | None:
        path = self._records / f"{sandbox_id}.json"
        try:
            return _Record(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable sandbox record %s: %s", path, exc)
            return None

    def _write(self, record: _Record) -> None:
        """Atomically, so a replica reading at the same time sees the old or the new record."""
        path = self._records / f"{record.sandbox_id}.json"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(asdict(record)))
        temporary.replace(path)

    def _forget(self, record: _Record, crashed: bool = False) -> None:
        log_path = self._records / f"{record.sandbox_id}.log"
        if crashed:
            output = log_path.read_text(errors="replace") if log_path.exists() else ""
            logger.warning("sandbox %s (pid %d) is gone; its last output:\n%s", record.sandbox_id, record.pid,
                           tail(output))
        (self._records / f"{record.sandbox_id}.json").unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
        self._children.pop(record.sandbox_id, None)
