"""Real processes for tests and benchmarks: started so that they can always be stopped.

Each process runs in a session of its own, so stopping it ends its whole group (a server and
every CLI it spawned), and writes to a log file whose tail goes into every error about it.
Waiting for it to come up fails as soon as it exits, instead of at the deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import httpx


class ProcessFailed(RuntimeError):
    """The process exited, or did not come up in time; the message ends with its log's tail."""


def free_port() -> int:
    """A loopback port nobody listens on now (the small race until it is bound is fine for tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """``GET url`` answers 200; ``False`` while nothing listens there yet."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.TransportError:
        return False


class Process(subprocess.Popen[bytes]):
    """A process in a session of its own, its output (stdout and stderr) appended to ``log_path``.

    A :class:`subprocess.Popen`, so callers signal and wait for it as usual.
    """

    def __init__(self, argv: Sequence[str], *, log_path: Path, name: str, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, user: str | None = None) -> None:
        self.log_path = log_path
        self.name = name
        with log_path.open("ab") as log:
            super().__init__(list(argv), cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=user)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _failed(self, timeout: float) -> ProcessFailed:
        if self.returncode is not None:
            return ProcessFailed(f"{self.name} exited with {self.returncode}:\n{self.log_tail()}")
        return ProcessFailed(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_until(self, probe: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
        """Poll ``probe`` until it is true; :class:`ProcessFailed` once the process exits or at ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if probe():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(interval)
        raise self._failed(timeout)

    async def await_until(self, probe: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> None:
        """:meth:`wait_until` for an event loop: ``probe`` is awaited, the loop never blocked."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if await probe():
                return
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(interval)
        raise self._failed(timeout)

    def wait_http(self, url: str, timeout: float) -> None:
        """Until ``GET url`` answers 200 (see :meth:`wait_until`)."""
        self.wait_until(lambda: http_ok(url), timeout)

    async def await_http(self, url: str, timeout: float) -> None:
        """Until ``GET url`` answers 200, polled from the event loop (see :meth:`await_until`)."""
        async with httpx.AsyncClient(timeout=2) as client:
            async def answers() -> bool:
                try:
                    return (await client.get(url)).status_code == 200
                except httpx.TransportError:
                    return False

            await self.await_until(answers, timeout)

    def stop(self, first: signal.Signals | None = None, grace: float = 0.0) -> None:
        """End the process and everything it started.

        ``first`` goes to the process alone, which then has ``grace`` seconds to exit by itself
        (a server draining its turns, Redis writing its file); then its group, and any
        descendant that left the group, get SIGKILL.
        """
        if first is not None and self.poll() is None:
            self.send_signal(first)
            try:
                self.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Only while it runs is its pid surely still its own (and its children found under it).
        stragglers = descendants(self.pid) if self.poll() is None else set()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.wait(30)
        except subprocess.TimeoutExpired:
            pass


def _stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (the CLIs a server started), from one scan of ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    return {pid for pid in pids if (fields := _stat_fields(pid)) is not None and fields[0] != "Z"}
