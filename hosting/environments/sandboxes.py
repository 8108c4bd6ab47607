"""One sandbox per session, and the runner inside it, through the backend interface.

A session's sandbox is named after a digest of the environment and session ids (an
API session id is not a valid container or pod name); its volume, named the same way,
holds the session's workspace and the runner's record, and outlives the sandbox. So
*stopping* a sandbox is deleting it (files kept), and *starting* a stopped one is
creating it again on the same volume. Everything is read back from the backend and
the runner's record, never from memory: a restarted orchestrator, or a second one,
sees what the first left.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hosting.sandboxes.base import Sandbox, SandboxBackend, SandboxError, SandboxSpec

RUNNER = ("python3", "-m", "hosting.environments.runner")
RUNNER_COMPONENT = ("app.kubernetes.io/component", "runner")
"""The label of a runner's pod: the runner NetworkPolicy lets it reach the egress proxy's
runner port only. Agent pods' ``sandbox`` label would open the key port to the model's commands."""
RunnerState = Literal["none", "running", "exited", "dead"]
SERVER_ENV = {
    "ANTHROPIC_API_KEY": "unused-the-sandbox-server-takes-no-turns",
    "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}
"""The sandbox's own server takes no turns here (only its ``/ready`` is asked, behind its
token), but it starts only with a model credential: a placeholder, and a model endpoint on
the discard port, so nothing it could start reaches a model or holds a real key."""


@dataclass(frozen=True)
class RunnerStatus:
    """What ``runner status`` reported (see :mod:`hosting.environments.runner`)."""

    state: RunnerState
    work_id: str | None = None
    work_created_at: str | None = None
    exit_code: int | None = None
    ended_at: float | None = None
    pid: int | None = None

    @classmethod
    def parse(cls, output: str) -> RunnerStatus:
        try:
            record: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SandboxError(f"runner status said {output.strip()[-300:]!r}") from None
        state = record.get("state")
        if state not in ("none", "running", "exited", "dead"):
            raise SandboxError(f"runner status has no valid state: {record!r}")
        return cls(state, record.get("work_id"), record.get("work_created_at") or None, record.get("exit_code"),
                   record.get("ended_at"), record.get("pid"))


@dataclass(frozen=True)
class RunnerLaunch:
    """What a runner is started with. ``secret`` is the work item's own credential."""

    work_id: str
    work_created_at: str
    session_id: str
    secret: str = field(repr=False)
    environment_id: str
    api_base_url: str | None
    max_idle_seconds: float

    def env(self) -> dict[str, str]:
        env = {
            "ANTHROPIC_ENVIRONMENT_ID": self.environment_id,
            "ANTHROPIC_WORK_ID": self.work_id,
            "ANTHROPIC_SESSION_ID": self.session_id,
            "ANTHROPIC_WORK_SECRET": self.secret,
            "AGENT_RUNNER_WORK_CREATED_AT": self.work_created_at,
            "AGENT_RUNNER_MAX_IDLE_SECONDS": repr(self.max_idle_seconds),
        }
        if self.api_base_url:
            env["ANTHROPIC_BASE_URL"] = self.api_base_url
        return env


def runner_pod_template_error(path: Path) -> str | None:
    """Why the kubernetes pod template at ``path`` must not start runners (``None``: it may).
    An unreadable or malformed file is left to the backend, which names what is wrong."""
    import yaml  # the kubernetes extra's, as the backend that reads the template

    try:
        template = yaml.safe_load(path.read_text())
        labels = template["metadata"]["labels"] or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    name, value = RUNNER_COMPONENT
    if labels.get(name) != value:
        return (f"the pod template {path} must label runner pods {name}: {value} (it has {labels.get(name)!r}): "
                "use hosting/kubernetes/base/runner-pod-template.yaml, not the agents' template, whose pods reach the "
                "egress proxy's key port")
    return None


def sandbox_name(environment_id: str, session_id: str) -> str:
    """The session's sandbox id, and the name of its volume: valid for every backend."""
    return "es-" + hashlib.sha256(f"{environment_id}\0{session_id}".encode()).hexdigest()[:24]


class SessionSandboxes:
    """Sandboxes of one environment on one backend, one per session."""

    def __init__(self, backend: SandboxBackend, environment_id: str) -> None:
        self.backend = backend
        self.environment_id = environment_id

    def sandbox_id(self, session_id: str) -> str:
        return sandbox_name(self.environment_id, session_id)

    def volume(self, session_id: str) -> str:
        return sandbox_name(self.environment_id, session_id)

    async def all(self) -> list[Sandbox]:
        return [s for s in await self.backend.list() if s.session_id is not None]

    async def find(self, session_id: str) -> Sandbox | None:
        wanted = self.sandbox_id(session_id)
        return next((s for s in await self.backend.list() if s.sandbox_id == wanted), None)

    async def ensure(self, session_id: str) -> Sandbox:
        """The session's running sandbox: the one that exists, or a new one on its volume."""
        existing = await self.find(session_id)
        if existing is not None:
            return existing
        spec = SandboxSpec(self.sandbox_id(session_id), self.volume(session_id), token=secrets.token_urlsafe(32),
                           env=SERVER_ENV, session_id=session_id, prewarm=False)
        return await self.backend.create(spec)

    async def runner(self, sandbox: Sandbox) -> RunnerStatus:
        result = await self.backend.run_command(sandbox.sandbox_id, (*RUNNER, "status"))
        if result.exit_code != 0:
            raise SandboxError(f"runner status failed in {sandbox.sandbox_id} ({result.exit_code}): "
                               f"{result.output.strip()[-300:]}")
        return RunnerStatus.parse(result.output)

    async def start_runner(self, sandbox: Sandbox, launch: RunnerLaunch) -> None:
        await self.backend.start_command(sandbox.sandbox_id, (*RUNNER, "run"), launch.env())

    async def stop_runner(self, sandbox: Sandbox) -> RunnerStatus:
        result = await self.backend.run_command(sandbox.sandbox_id, (*RUNNER, "stop"), timeout=30.0)
        return RunnerStatus.parse(result.output)

    async def stop(self, sandbox: Sandbox) -> None:
        """Stop the sandbox; its volume (the session's files) stays for the next item."""
        await self.backend.delete(sandbox.sandbox_id)

    async def remove(self, session_id: str) -> None:
        """Remove the session's sandbox and its volume: the session has ended."""
        sandbox = await self.find(session_id)
        if sandbox is not None:
            await self.backend.delete(sandbox.sandbox_id)
        await self.backend.delete_volume(self.volume(session_id))
