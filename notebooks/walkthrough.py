"""Helpers of the hosting walkthrough notebook: run commands, keep track of what was started, tear it all down.

The notebook shells out the way an operator would; these helpers only echo each command
before running it, keep the background processes, containers and stand-ins it starts in
one registry, and undo all of them in :func:`teardown` (which the notebook's last cell
and ``tests/system/test_notebook.py`` call, the test also when a cell failed).

Settings are read once, here, from the environment (see :class:`Settings`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LABEL = "research-agent.walkthrough"
"""Docker label on every container the notebook runs itself (compose ones carry their project's)."""


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@dataclass(frozen=True)
class Settings:
    """What the notebook does, decided once from the environment.

    - ``NOTEBOOK_LIVE=1``: the real Anthropic API (``ANTHROPIC_API_KEY`` or
      ``CLAUDE_CODE_OAUTH_TOKEN`` must be set) and your real Modal workspace; otherwise the
      local model and the Modal stand-in, offline.
    - ``NOTEBOOK_AGENT_IMAGE``: an image already built from ``hosting/Dockerfile``; unset, the
      notebook builds ``research-agent:walkthrough`` on ``NOTEBOOK_BASE_IMAGE``.
    - ``NOTEBOOK_BASE_IMAGE``: the Dockerfile's base (default the public
      ``python:3.11-slim-bookworm``; ``research-agent-base:bookworm`` without a registry).
    - ``NOTEBOOK_RUN_ID``: names this run's compose project and labels its containers.
    """

    live: bool
    agent_image: str
    prebuilt_image: bool
    base_image: str
    run_id: str
    docker: bool

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        live = env.get("NOTEBOOK_LIVE", "").strip() == "1"
        if live and not (env.get("ANTHROPIC_API_KEY") or env.get("CLAUDE_CODE_OAUTH_TOKEN")):
            raise RuntimeError("NOTEBOOK_LIVE=1 needs ANTHROPIC_API_KEY (or CLAUDE_CODE_OAUTH_TOKEN) in the environment; "
                               "unset NOTEBOOK_LIVE to run offline")
        image = env.get("NOTEBOOK_AGENT_IMAGE", "").strip()
        return cls(
            live=live,
            agent_image=image or "research-agent:walkthrough",
            prebuilt_image=bool(image),
            base_image=env.get("NOTEBOOK_BASE_IMAGE", "").strip() or "python:3.11-slim-bookworm",
            run_id=env.get("NOTEBOOK_RUN_ID", "").strip() or "walkthrough",
            docker=_docker_answers(),
        )


@dataclass
class Registry:
    """Everything the notebook started, so that :func:`teardown` can undo exactly that."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="walkthrough-")))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    """Every process ever started, kept after teardown so :func:`leftovers` can check them."""
    container_labels: set[str] = field(default_factory=set)
    """``key=value`` labels marking the containers the notebook is responsible for."""


REGISTRY = Registry()


def port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1 (the documented defaults read best), else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


def _tidy(text: str) -> str:
    """Output without this run's scratch directory (a host-specific path)."""
    return text.replace(str(REGISTRY.workdir), "$WORK").replace(str(ROOT), ".")


@dataclass(frozen=True)
class Ran:
    """What a command printed; shows nothing as a cell's value (:func:`sh` printed it already)."""

    stdout: str
    returncode: int

    def _ipython_display_(self) -> None:
        pass


def sh(command: str, env: Mapping[str, str] | None = None, *, check: bool = True, timeout: float = 900,
       quiet: bool = False) -> Ran:
    """Echo ``command``, run it with bash from the repository root (``env`` added to this
    process's environment, so ``$NAMES`` in the echoed command stay unexpanded and secrets
    out of the output), print what it printed; a non-zero exit fails the cell."""
    print(f"$ {command}")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    output = (proc.stdout + proc.stderr).strip()
    if output and not quiet:
        print(_tidy(output))
    if check and proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {_tidy(output)[-2000:]}")
    return Ran(proc.stdout, proc.returncode)


def docker_sh(settings: Settings, command: str, env: Mapping[str, str] | None = None,
              **options: Any) -> Ran | None:
    """:func:`sh` when a Docker engine answers; otherwise say so and show the command."""
    if not settings.docker:
        print(f"(Docker is not available here; the command would be)\n$ {command}")
        return None
    return sh(command, env, **options)


def start(name: str, argv: list[str], env: Mapping[str, str], health_url: str, timeout: float = 60) -> None:
    """Start a background process (its own process group, output in a log file) and wait
    until ``health_url`` answers 200."""
    log = open(REGISTRY.workdir / f"{name}.log", "wb")
    print(f"$ {' '.join(argv)} &")
    process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    REGISTRY.processes[name] = process
    REGISTRY.pids.add(process.pid)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_of(name)}")
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer {health_url} within {timeout:.0f} s:\n{log_of(name)}")
        time.sleep(0.2)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 120) -> None:
    """Poll ``predicate`` (connection errors count as not yet) until it holds; fail the cell after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def wait_http(url: str, timeout: float = 120) -> None:
    """Until ``url`` answers 200 (a container or sandbox that is still starting)."""
    wait_until(f"{url} answering 200", lambda: httpx.get(url, timeout=2).status_code == 200, timeout)


def log_of(name: str) -> str:
    return _tidy((REGISTRY.workdir / f"{name}.log").read_text(errors="replace"))


def on_teardown(what: str, action: Callable[[], None]) -> None:
    """Register an undo step (run in reverse order by :func:`teardown`)."""
    REGISTRY.undo.append((what, action))


def undo(what: str) -> None:
    """Run the undo step registered as ``what`` now (a cell that tears its own tier down)."""
    for index, (name, action) in enumerate(REGISTRY.undo):
        if name == what:
            del REGISTRY.undo[index]
            action()
            return
    raise KeyError(what)


def watch_containers(label: str) -> None:
    """Containers carrying ``label`` (``key=value``) must be gone after teardown."""
    REGISTRY.container_labels.add(label)


def leftovers() -> list[str]:
    """What still runs of what the notebook started: live processes and watched containers."""
    found = []
    for pid in sorted(REGISTRY.pids):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state != "Z":
            found.append(f"process {pid}")
    for label in sorted(REGISTRY.container_labels) if shutil.which("docker") else ():
        listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True,
                                timeout=60)
        found += [f"container {cid} ({label})" for cid in listed.stdout.split()]
    return found


def turn(base_url: str, session_id: str, prompt: str, *, token_variable: str | None = None,
         env: Mapping[str, str] | None = None, raw: bool = False) -> None:
    """One turn with curl, as in the README; prints the event types and the answer (``raw``:
    the stream as it came)."""
    bearer = f" -H \"authorization: Bearer ${token_variable}\"" if token_variable else ""
    body = json.dumps({"prompt": prompt}).replace("'", "'\\''")
    proc = sh(f"curl -sSN -X POST {base_url}/sessions/{session_id}/messages{bearer} "
              f"-H 'content-type: application/json' -d '{body}'", env, quiet=True, timeout=600)
    if raw:
        print(proc.stdout.strip())
    kinds, text = [], []
    for block in proc.stdout.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            kinds.append(fields["event"])
            if fields["event"] == "text":
                text.append(json.loads(fields["data"])["text"])
            elif fields["event"] == "error":
                raise RuntimeError(f"the turn failed: {fields['data']}")
    print(f"events: {' '.join(kinds)}\nanswer: {''.join(text)}")


def teardown() -> None:
    """Undo everything the notebook started, newest first, then stop its processes
    (SIGTERM to each process group, SIGKILL after 30 s); say what was stopped."""
    while REGISTRY.undo:
        what, action = REGISTRY.undo.pop()
        try:
            action()
            print(f"stopped: {what}")
        except Exception as exc:  # noqa: BLE001 - the rest must still be undone
            print(f"could not stop {what}: {exc}", file=sys.stderr)
    for name, process in reversed(list(REGISTRY.processes.items())):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything its group left behind
        except ProcessLookupError:
            pass
        print(f"stopped: {name}")
    REGISTRY.processes.clear()
    shutil.rmtree(REGISTRY.workdir, ignore_errors=True)
