"""The tool runner inside a sandbox: one claimed work item, served by the SDK's worker.

The orchestrator claims a work item and starts this in the session's sandbox::

    python3 -m hosting.environments.runner run      serve the item (environment below), then exit
    python3 -m hosting.environments.runner status   one JSON line: is a runner alive, for which item
    python3 -m hosting.environments.runner stop     end the runner (SIGTERM, then SIGKILL)

``run`` reads ``ANTHROPIC_ENVIRONMENT_ID``, ``ANTHROPIC_WORK_ID``, ``ANTHROPIC_SESSION_ID``,
``ANTHROPIC_WORK_SECRET`` (the item's own secret: never the environment key, which the
sandbox does not hold) and ``ANTHROPIC_BASE_URL``, plus ``AGENT_RUNNER_WORK_CREATED_AT``
and ``AGENT_RUNNER_MAX_IDLE_SECONDS``. It runs ``EnvironmentWorker.handle_item()``: the
SDK heartbeats the lease, runs the session's tool calls in
``$AGENT_DATA_DIR/workspace/<session id>`` and stops the item when the session is done
(or leaves it to the queue when the lease was lost).

What the orchestrator reads, in ``$AGENT_DATA_DIR/environment/``:

- ``runner.json``: pid, work id, the item's ``created_at``, start time, and once it
  ends its exit status. Written atomically.
- ``runner.lock``: an ``flock`` the runner holds while it lives. The kernel drops it
  however the runner ends (SIGKILL included), so a free lock with no exit status means
  the runner died, and a reused pid is never mistaken for it.

This module imports the SDK only in ``run``: ``status`` and ``stop`` stay quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from hosting.environments.credentials import sessions_token

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""What a session id may look like before it names a directory."""
EXIT_SIGNALLED = 143
EXIT_BUSY = 3
"""Another runner holds this sandbox's lock."""
STOP_GRACE_SECONDS = 10.0

logger = logging.getLogger("hosting.environments.runner")


def state_dir() -> Path:
    return Path(os.environ.get("AGENT_DATA_DIR") or ".") / "environment"


def workspace(session_id: str) -> Path:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ValueError(f"invalid session id {session_id!r}")
    return Path(os.environ.get("AGENT_DATA_DIR") or ".") / "workspace" / session_id


def _write_record(directory: Path, record: dict[str, Any]) -> None:
    temporary = directory / ".runner.json.tmp"
    temporary.write_text(json.dumps(record))
    temporary.replace(directory / "runner.json")


def _read_record(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / "runner.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def _held(lock: IO[bytes], timeout: float) -> Iterator[bool]:
    """Whether the exclusive lock could be taken within ``timeout`` (held inside)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.05)
    try:
        yield True
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def status() -> dict[str, Any]:
    """``state``: ``none`` (no runner ever), ``running``, ``exited`` (with ``exit_code``)
    or ``dead`` (ended without recording it: killed); plus the record's fields."""
    directory = state_dir()
    record = _read_record(directory)
    if record is None:
        return {"state": "none"}
    try:
        with (directory / "runner.lock").open("rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        return {**record, "state": "running"}
    except FileNotFoundError:
        pass
    return {**record, "state": "exited" if record.get("exit_code") is not None else "dead"}


def stop() -> dict[str, Any]:
    """End a running runner: SIGTERM (the worker stops its item), SIGKILL after a grace."""
    current = status()
    if current["state"] != "running":
        return current
    pid = int(current["pid"])
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            current = status()
            if current["state"] != "running":
                return current
            time.sleep(0.05)
    return status()


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"{name} is required")
    return value


async def _serve(session_id: str, workdir: Path) -> None:
    """``handle_item`` on the item's own credential; cancelled by SIGTERM."""
    from anthropic import AsyncAnthropic
    from anthropic.lib.environments import EnvironmentWorker

    secret = _required("ANTHROPIC_WORK_SECRET")
    token = sessions_token(secret)
    if token is None:
        raise ValueError("ANTHROPIC_WORK_SECRET carries no sessions token")
    max_idle = float(os.environ.get("AGENT_RUNNER_MAX_IDLE_SECONDS") or 60)
    # Explicit credentials: the client then reads no ANTHROPIC_API_KEY nor credential files.
    client = AsyncAnthropic(auth_token=token, base_url=os.environ.get("ANTHROPIC_BASE_URL") or None)
    worker = EnvironmentWorker(client, workdir=workdir, max_idle=max_idle)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await worker.handle_item(work_id=_required("ANTHROPIC_WORK_ID"),
                                 environment_id=_required("ANTHROPIC_ENVIRONMENT_ID"),
                                 session_id=session_id, work_secret=secret)
    finally:
        await client.close()


def run() -> int:
    """Serve one work item; the exit status is recorded as well as returned."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    session_id = _required("ANTHROPIC_SESSION_ID")
    workdir = workspace(session_id)
    workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=directory / "runner.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with (directory / "runner.lock").open("ab") as lock, _held(lock, 5.0) as held:
        if not held:
            logger.error("another runner is running in this sandbox")
            return EXIT_BUSY
        record: dict[str, Any] = {
            "pid": os.getpid(), "work_id": _required("ANTHROPIC_WORK_ID"), "session_id": session_id,
            "work_created_at": os.environ.get("AGENT_RUNNER_WORK_CREATED_AT", ""), "started_at": time.time(),
            "exit_code": None, "ended_at": None,
        }
        _write_record(directory, record)
        logger.info("serving work_id=%s session_id=%s", record["work_id"], session_id)
        try:
            asyncio.run(_serve(session_id, workdir))
            code = 0
        except (asyncio.CancelledError, KeyboardInterrupt):
            code = EXIT_SIGNALLED
        except BaseException as exc:  # noqa: BLE001 - recorded: the orchestrator reads the status
            logger.exception("work item failed: %s", exc)
            code = 1
        logger.info("runner ended work_id=%s exit_code=%d", record["work_id"], code)
        _write_record(directory, {**record, "exit_code": code, "ended_at": time.time()})
        return code


def main(argv: list[str] | None = None) -> int:
    command = (argv if argv is not None else sys.argv[1:])[:1]
    if command == ["run"]:
        return run()
    if command == ["status"]:
        print(json.dumps(status()))
        return 0
    if command == ["stop"]:
        print(json.dumps(stop()))
        return 0
    print("usage: python3 -m hosting.environments.runner run|status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
