"""Start a command inside a sandbox from a request read on stdin.

Why it exists: a backend that reaches into a sandbox through its engine's API (the
kubernetes backend's ``pods/exec``) names the command in the request URL, which API
servers write to their audit logs, and a command line is visible to every process in
the sandbox. A command's ``env`` may hold a secret (a work item's token). So such a
backend runs ``python3 -m hosting.sandboxes.launch`` and sends the real command as one
JSON line on its stdin (:func:`encode_request`)::

    {"argv": ["python3", "-m", "..."], "env": {"NAME": "value"}, "detach": false}

The launcher changes to the sandbox's data dir (``AGENT_DATA_DIR``, ``/data`` when unset,
as the server reads it) and runs ``argv`` with ``env`` over its own environment, stdin
from /dev/null:

- ``detach: false``: waits for the command and exits with its status (128 + N when signal
  N ended it). The command (its whole session) is killed when the launcher's stdin closes:
  the caller went away or gave up (a timeout), and nobody would read what it does. That is
  why the launcher waits for the command instead of replacing itself with it (``exec``).
- ``detach: true``: starts it in a session of its own with stdio on /dev/null, prints its
  pid and exits 0 at once; it runs until it exits or the sandbox is deleted.

A request that cannot be read, or a command that cannot start, exits :data:`CANNOT_START`
with one line on stderr that starts with :data:`FAILED`, and starts nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMAND = ("python3", "-m", "hosting.sandboxes.launch")
"""What a backend runs in the sandbox: the sandbox's interpreter, this module."""
CANNOT_START = 127
"""The exit status when nothing was started (as shells say "command not found")."""
FAILED = "hosting.sandboxes.launch: "
"""How the launcher's own error line starts."""
DEFAULT_DATA_DIR = "/data"


@dataclass(frozen=True)
class LaunchRequest:
    """One command to start, as read from stdin."""

    argv: list[str]
    env: dict[str, str]
    detach: bool


def encode_request(argv: Sequence[str], env: Mapping[str, str] | None, *, detach: bool) -> bytes:
    """The request line for ``argv`` (one JSON line, newline-terminated); :class:`ValueError`
    for what no process could be started with, before anything is sent."""
    request = LaunchRequest(list(argv), dict(env or {}), detach)
    _check(request)
    return json.dumps({"argv": request.argv, "env": request.env, "detach": request.detach}).encode() + b"\n"


def decode_request(line: bytes) -> LaunchRequest:
    """The request in ``line``; :class:`ValueError` saying what is wrong with it."""
    try:
        fields: Any = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise ValueError(f"the request is not one JSON line: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != {"argv", "env", "detach"}:
        raise ValueError("the request must be an object with exactly argv, env and detach")
    request = LaunchRequest(fields["argv"], fields["env"], fields["detach"])
    _check(request)
    return request


def _check(request: LaunchRequest) -> None:
    argv, env = request.argv, request.env
    if not isinstance(argv, list) or not argv or not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
        raise ValueError("argv must be a non-empty list of strings without NUL")
    if not isinstance(env, dict) or not all(
            isinstance(name, str) and name and "=" not in name and "\0" not in name
            and isinstance(value, str) and "\0" not in value for name, value in env.items()):
        raise ValueError("env must map names (no '=' or NUL) to strings without NUL")
    if not isinstance(request.detach, bool):
        raise ValueError("detach must be true or false")


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _fail(message: str) -> int:
    print(f"{FAILED}{message}", file=sys.stderr, flush=True)
    return CANNOT_START


def _kill_when_stdin_closes(child: subprocess.Popen[bytes]) -> None:
    while os.read(0, 65536):
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    try:
        request = decode_request(sys.stdin.buffer.readline())
    except ValueError as exc:
        return _fail(str(exc))
    data_dir = Path(os.environ.get("AGENT_DATA_DIR", "").strip() or DEFAULT_DATA_DIR)
    quiet = subprocess.DEVNULL if request.detach else None
    try:
        child = subprocess.Popen(request.argv, cwd=data_dir, env={**os.environ, **request.env},
                                 stdin=subprocess.DEVNULL, stdout=quiet, stderr=quiet, start_new_session=True)
    except OSError as exc:
        return _fail(f"cannot start {request.argv[0]}: {exc.strerror or exc}")
    if request.detach:
        print(child.pid, flush=True)
        return 0
    threading.Thread(target=_kill_when_stdin_closes, args=(child,), daemon=True).start()
    return exit_status(child.wait())


if __name__ == "__main__":
    sys.exit(main())
