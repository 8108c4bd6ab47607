"""One conformance suite for every sandbox backend: memory, local, docker and kubernetes.

Each test drives a backend through the :class:`SandboxBackend` interface only, and
the same assertions hold for all of them. What the interface cannot do (crash a
sandbox behind the backend's back, see what an engine still holds of a sandbox)
each harness does the engine's own way: the memory backend's helpers, SIGKILL and
``/proc`` for local, the Docker SDK for docker, the stand-in of the pods API
(tests/standins/k8s.py) for kubernetes, whose pods keep their conversations in a real
Redis (the SessionStore) instead of a volume; the cases about volumes also run kubernetes
in ``pvc`` mode (``kubernetes-pvc``: no SessionStore, each volume a PersistentVolumeClaim
that the stand-in's pods mount as a directory). The local and docker sandboxes run
the real server, and their turns go through the real SDK and CLI to the local
model; docker sandboxes use the host network, so every request goes to 127.0.0.1.

Every sandbox, process, container and volume a test makes is removed at teardown,
even when the test fails: through the backend, then by force (docker: everything
labelled with the test's own installation; local: every process tagged with one of
the test's sandbox ids).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.processes import descendants
from hosting.sandboxes import Health, Sandbox, SandboxBackend, SandboxError, SandboxSpec
from hosting.sandboxes._shared import free_loopback_port
from hosting.sandboxes.local import SANDBOX_TAG, LocalBackend
from hosting.sandboxes.memory import MemoryBackend
from tests.standins.k8s import POD_TEMPLATE, PodsApiStandIn
from tests.standins.modal import ModalStandIn
from tests.support import ROOT
from tests.support.modal_standin import MODAL_APP
from tests.support.servers import API_KEY, LocalModel
from tests.support.turns import Turn, post_turn

SESSION = "conformance-1"
RECALL = "What value did I ask you to remember?"
READY_TIMEOUT = 90.0

BACKENDS = [
    "memory",
    pytest.param("local", marks=pytest.mark.e2e),
    pytest.param("docker", marks=[pytest.mark.docker, pytest.mark.e2e]),
    pytest.param("kubernetes", marks=[pytest.mark.kubernetes, pytest.mark.e2e]),
    pytest.param("modal", marks=[pytest.mark.modal, pytest.mark.docker, pytest.mark.e2e]),
]
VOLUME_CASES = [*BACKENDS, pytest.param("kubernetes-pvc", marks=[pytest.mark.kubernetes, pytest.mark.e2e])]
"""For the cases about volumes: kubernetes in ``pvc`` mode too. The other cases do not tell the
two modes apart (a pod is a pod), and every kubernetes case costs real server processes."""


@dataclass
class Harness:
    """A backend under test, and what the tests need of its engine beyond the interface."""

    backend: SandboxBackend
    env: dict[str, str]
    """The spec environment of a sandbox that can take a turn (the local model)."""
    real: bool
    """Whether sandboxes run a real server (a turn can be taken)."""
    kill: Callable[[Sandbox], None]
    """Crash the sandbox behind the backend's back."""
    traces: Callable[[str, int | None], list[str]]
    """What the engine still holds of a sandbox (id, and pid where known): processes,
    records, containers, an unreaped server."""
    volume_exists: Callable[[str], bool]
    replica: Callable[[], SandboxBackend]
    """Another backend object on the same engine and installation (another gateway replica)."""
    stranger: Callable[[], SandboxBackend] | None
    """A backend of another installation on the same engine, if the engine has installations."""
    failing: Callable[[Harness], tuple[SandboxBackend, SandboxSpec, str]]
    """A backend and a spec whose create must fail, and a phrase of the error."""
    claims_recorded: bool = True
    """Whether the engine records a claim, so a second claim of one sandbox fails."""
    volumes_on_engine: bool = True
    """Whether the engine holds volumes (kubernetes in ``emptydir`` mode: ``/data`` goes with
    its pod and the conversation lives in the SessionStore, so only "in use" applies)."""
    close: Callable[[], None] = lambda: None
    """Release the harness's own engine client."""
    command_uid: int = 10001
    """The uid commands in a sandbox run as: the image's user, or the test's own where the
    engine runs sandboxes as plain processes (local; the kubernetes stand-in's kubelet)."""
    specs: list[SandboxSpec] = field(default_factory=list)

    def spec(self, session_id: str | None = SESSION, volume: str | None = None,
             env: dict[str, str] | None = None) -> SandboxSpec:
        """A fresh sandbox id and token; removed with its volume at teardown."""
        spec = SandboxSpec(sandbox_id=f"conf-{secrets.token_hex(6)}", volume=volume or f"vol-{secrets.token_hex(6)}",
                           token=secrets.token_urlsafe(24), env=self.env if env is None else env,
                           session_id=session_id, tenant="acme" if session_id else None)
        self.specs.append(spec)
        return spec

    async def cleanup(self) -> None:
        for spec in self.specs:
            with suppress(Exception):
                await self.backend.delete(spec.sandbox_id)
            with suppress(Exception):
                await self.backend.delete_volume(spec.volume)
        await self.backend.aclose()
        self.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def turn(sandbox: Sandbox, token: str, prompt: str) -> Turn:
    return await asyncio.to_thread(post_turn, sandbox.address, SESSION, prompt, headers=bearer(token))


async def eventually(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.05)


def model_env(local_model: LocalModel) -> dict[str, str]:
    return {"ANTHROPIC_BASE_URL": local_model.base_url, "ANTHROPIC_API_KEY": API_KEY,
            "CLAUDE_CODE_MAX_RETRIES": "0", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}


# --- memory ------------------------------------------------------------------------------------

def memory_traces(backend: MemoryBackend, sandbox_id: str) -> list[str]:
    try:
        backend.spec_of(sandbox_id)
    except KeyError:
        return []
    return [f"sandbox {sandbox_id}"]


def memory_harness() -> Harness:
    backend = MemoryBackend()

    def failing(harness: Harness) -> tuple[SandboxBackend, SandboxSpec, str]:
        backend.fail_next_create("the engine refused")
        return backend, harness.spec(), "the engine refused"

    return Harness(
        backend=backend, env={}, real=False,
        kill=lambda sandbox: backend.kill(sandbox.sandbox_id),
        traces=lambda sandbox_id, pid: memory_traces(backend, sandbox_id),
        volume_exists=lambda volume: volume in backend.volumes,
        replica=lambda: backend, stranger=None, failing=failing,
    )


# --- local -------------------------------------------------------------------------------------

def tagged_processes(sandbox_ids: set[str]) -> dict[int, str]:
    """Every live process (server or CLI) whose environment carries one of these sandbox tags."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in entries:
            name, _, value = entry.decode(errors="replace").partition("=")
            if name == SANDBOX_TAG and value in sandbox_ids:
                found[int(environ.parent.name)] = value
    return found


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` exited and its parent (this process, for a server it started) has not reaped it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def kill_local(sandbox: Sandbox) -> None:
    assert sandbox.pid is not None
    os.kill(sandbox.pid, signal.SIGKILL)


def local_harness(data_dir: Path, env: dict[str, str], installation: str) -> Harness:
    backend = LocalBackend(data_dir, installation)
    records = data_dir / "sandboxes"

    def traces(sandbox_id: str, pid: int | None) -> list[str]:
        files = [p.name for p in records.glob(f"{sandbox_id}.*")] if records.exists() else []
        processes = [f"pid {found}" for found in tagged_processes({sandbox_id})]
        return files + processes + ([f"zombie {pid}"] if pid is not None and is_zombie(pid) else [])

    def failing(harness: Harness) -> tuple[SandboxBackend, SandboxSpec, str]:
        return backend, harness.spec(env={}), "No model credentials"  # the server exits 2 at start

    return Harness(
        backend=backend, env=env, real=True,
        kill=kill_local,
        traces=traces, volume_exists=lambda volume: (data_dir / "volumes" / volume).exists(),
        replica=lambda: LocalBackend(data_dir, installation),
        stranger=lambda: LocalBackend(data_dir, "someone-else"), failing=failing, command_uid=os.getuid(),
    )


# --- docker ------------------------------------------------------------------------------------

def docker_harness(image: str, env: dict[str, str], installation: str) -> Harness:
    import docker
    from docker.errors import NotFound

    from hosting.sandboxes.docker import DockerBackend, volume_name

    client = docker.from_env()

    def backend(of: str = installation, image: str = image) -> DockerBackend:
        return DockerBackend(image, of, network="host", client=client)

    def traces(sandbox_id: str, pid: int | None) -> list[str]:
        found = client.containers.list(all=True, filters={"name": f"^/agent-{sandbox_id}$"})
        return [f"container {c.name} ({c.status})" for c in found]

    def volume_exists(volume: str) -> bool:
        try:
            client.volumes.get(volume_name(volume))
        except NotFound:
            return False
        return True

    def failing(harness: Harness) -> tuple[SandboxBackend, SandboxSpec, str]:
        return backend(image="research-agent:no-such-image"), harness.spec(), "is not on the Docker engine"

    return Harness(
        backend=backend(), env=env, real=True,
        kill=lambda sandbox: client.containers.get(f"agent-{sandbox.sandbox_id}").kill(),
        traces=traces, volume_exists=volume_exists, replica=backend,
        stranger=lambda: backend(f"{installation}-other"), failing=failing, claims_recorded=False,
        close=client.close,
    )


def remove_docker_installation(installation: str) -> None:
    """Force-remove whatever carries this installation's label (and its stranger's)."""
    import docker

    client = docker.from_env()
    for of in (installation, f"{installation}-other"):
        label = f"research-agent.installation={of}"
        for container in client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
        for volume in client.volumes.list(filters={"label": label}):
            volume.remove(force=True)
    client.close()


# --- kubernetes --------------------------------------------------------------------------------

def kubernetes_harness(standin: PodsApiStandIn, kubeconfig: Path, env: dict[str, str],
                       installation: str, volumes: str = "emptydir") -> tuple[Harness, list[SandboxBackend]]:
    """Pods through the stand-in of the pods API (each backend object with its own client,
    like a replica); the harness, and every backend it opened, to close. In ``pvc`` mode a
    volume exists while the stand-in holds its claim."""
    from hosting.sandboxes.kubernetes import KubernetesBackend, claim_name, pod_name

    opened: list[SandboxBackend] = []

    def backend(of: str = installation, image: str | None = None) -> KubernetesBackend:
        made = KubernetesBackend(POD_TEMPLATE, standin.namespace, of, kubeconfig=kubeconfig, image=image,
                                 volumes="pvc" if volumes == "pvc" else "emptydir")
        opened.append(made)
        return made

    def failing(harness: Harness) -> tuple[SandboxBackend, SandboxSpec, str]:
        return backend(image="research-agent:no-such-image"), harness.spec(), "ErrImagePull"

    return Harness(
        backend=backend(), env=env, real=True,
        kill=lambda sandbox: standin.kill(pod_name(sandbox.sandbox_id)),
        traces=lambda sandbox_id, pid: standin.traces(pod_name(sandbox_id)),
        volume_exists=lambda volume: claim_name(installation, volume) in standin.claim_names(),
        replica=backend, stranger=lambda: backend(f"{installation}-other"),
        failing=failing, volumes_on_engine=volumes == "pvc", command_uid=os.getuid(),
    ), opened


# --- modal -------------------------------------------------------------------------------------

def modal_harness(standin: ModalStandIn, env: dict[str, str], installation: str) -> Harness:
    """Modal Sandboxes through the stand-in of Modal's control plane: the real ``modal`` client
    over gRPC, sandboxes as containers, tunnels as HTTPS on loopback. Re-tagging a claim is not
    atomic on Modal, so a second claim is not refused there (the routing store refuses it)."""
    from hosting.sandboxes.modal import ModalBackend, volume_name

    def backend(of: str = installation, secrets: tuple[str, ...] = ()) -> ModalBackend:
        return ModalBackend(MODAL_APP, of, secrets=secrets)

    def failing(harness: Harness) -> tuple[SandboxBackend, SandboxSpec, str]:
        return backend(secrets=("no-such-secret",)), harness.spec(), "Secret 'no-such-secret' not found"

    def kill(sandbox: Sandbox) -> None:
        for sandbox_id in standin.named(sandbox.sandbox_id):
            standin.kill(sandbox_id)

    return Harness(
        backend=backend(), env=env, real=True, kill=kill,
        traces=lambda sandbox_id, pid: standin.traces(sandbox_id),
        volume_exists=lambda volume: volume_name(installation, volume) in standin.volume_names(),
        replica=backend, stranger=lambda: backend(f"{installation}-other"), failing=failing, claims_recorded=False,
    )


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    installation = f"t{secrets.token_hex(4)}"
    if request.param == "memory":
        made = memory_harness()
    elif request.param == "local":
        made = local_harness(tmp_path / "gateway-data", model_env(request.getfixturevalue("local_model")),
                             installation)
    elif request.param == "modal":
        request.getfixturevalue("modal_env")
        made = modal_harness(request.getfixturevalue("modal_standin"),
                             model_env(request.getfixturevalue("local_model")), installation)
    elif request.param == "kubernetes":
        standin = PodsApiStandIn(tmp_path / "standin").start()
        made, opened = kubernetes_harness(standin, standin.kubeconfig(tmp_path / "kubeconfig"), {
            **model_env(request.getfixturevalue("local_model")),
            "AGENT_SESSION_STORE": request.getfixturevalue("redis_url")}, installation)
    elif request.param == "kubernetes-pvc":
        standin = PodsApiStandIn(tmp_path / "standin").start()
        made, opened = kubernetes_harness(standin, standin.kubeconfig(tmp_path / "kubeconfig"),
                                          model_env(request.getfixturevalue("local_model")), installation, "pvc")
    else:
        made = docker_harness(request.getfixturevalue("agent_image"),
                              model_env(request.getfixturevalue("local_model")), installation)
    try:
        yield made
    finally:
        await made.cleanup()
        if request.param == "local":
            for pid in tagged_processes({s.sandbox_id for s in made.specs}):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif request.param == "docker":
            remove_docker_installation(installation)
        elif request.param == "modal":
            request.getfixturevalue("modal_standin").terminate_tagged("research-agent.installation",
                                                                      {installation, f"{installation}-other"})
        elif request.param in ("kubernetes", "kubernetes-pvc"):
            for backend in opened:
                await backend.aclose()
            standin.stop()
            assert standin.unexpected == []


# --- the conformance suite ---------------------------------------------------------------------

@pytest.mark.parametrize("harness", VOLUME_CASES, indirect=True)
async def test_lifecycle_and_a_conversation_that_outlives_its_sandbox(harness: Harness) -> None:
    """create → ready → a turn → 401 for a wrong token → listed → a second create of the
    same id refused → deleted (gone, unlisted, nothing left) → a new sandbox on the same
    volume recalls the turn → the volume cannot go while in use, then goes; every delete
    is idempotent, and names no engine could hold are refused."""
    backend = harness.backend
    spec = harness.spec()
    sandbox = await backend.create(spec)
    assert (sandbox.sandbox_id, sandbox.backend, sandbox.volume, sandbox.session_id, sandbox.tenant) == (
        spec.sandbox_id, backend.name, spec.volume, SESSION, "acme")
    await backend.wait_ready(sandbox, spec.token, READY_TIMEOUT)
    assert await backend.health(sandbox, spec.token) is Health.READY
    assert await backend.health(sandbox, "not-the-token") is Health.STARTING
    assert await backend.exists(spec.sandbox_id)
    if harness.real:
        first = await turn(sandbox, spec.token, "Remember this value: 42")
        assert first.types[-1] == "done" and not first.result["is_error"]
        assert first.of("session")[0]["resumed"] is False
        async with httpx.AsyncClient(timeout=10) as client:
            refused = await client.post(f"{sandbox.address}/sessions/{SESSION}/messages", json={"prompt": "hi"},
                                        headers=bearer("not-the-token"))
        assert refused.status_code == 401
    assert [s for s in await backend.list() if s.sandbox_id == spec.sandbox_id] == [sandbox]
    with pytest.raises(SandboxError, match="exists already"):
        await backend.create(spec)
    assert await backend.health(sandbox, spec.token) is Health.READY

    await backend.delete(spec.sandbox_id)
    assert await backend.health(sandbox, spec.token) is Health.GONE
    assert spec.sandbox_id not in {s.sandbox_id for s in await backend.list()}
    assert not await backend.exists(spec.sandbox_id)
    await eventually(lambda: harness.traces(spec.sandbox_id, sandbox.pid) == [])
    assert harness.volume_exists(spec.volume) or not harness.volumes_on_engine

    again = harness.spec(volume=spec.volume)
    second = await backend.create(again)
    await backend.wait_ready(second, again.token, READY_TIMEOUT)
    if harness.real:
        recalled = await turn(second, again.token, RECALL)
        assert recalled.of("session")[0]["resumed"] is True
        assert "You asked me to remember 42." in recalled.text
    with pytest.raises(SandboxError, match="in use"):
        await backend.delete_volume(spec.volume)
    assert harness.volume_exists(spec.volume) or not harness.volumes_on_engine
    await backend.delete(again.sandbox_id)
    await backend.delete_volume(spec.volume)
    assert not (harness.volumes_on_engine and harness.volume_exists(spec.volume))

    for sandbox_id in (spec.sandbox_id, again.sandbox_id):
        await backend.delete(sandbox_id)
    await backend.delete_volume(spec.volume)
    with pytest.raises(ValueError):
        await backend.delete("../escape")
    with pytest.raises(ValueError):
        await backend.delete_volume("..")


async def test_a_killed_sandbox_is_gone(harness: Harness) -> None:
    """A crash (SIGKILL, ``docker kill``, ``kill()``) reads GONE and unlisted; deleting
    it afterwards is fine and leaves nothing (for local: its CLIs died with it, no zombie)."""
    spec = harness.spec()
    sandbox = await harness.backend.create(spec)
    await harness.backend.wait_ready(sandbox, spec.token, READY_TIMEOUT)
    harness.kill(sandbox)
    assert await harness.backend.health(sandbox, spec.token) is Health.GONE
    assert spec.sandbox_id not in {s.sandbox_id for s in await harness.backend.list()}
    await harness.backend.delete(spec.sandbox_id)
    await eventually(lambda: harness.traces(spec.sandbox_id, sandbox.pid) == [])


@pytest.mark.parametrize("harness", VOLUME_CASES, indirect=True)
async def test_a_failed_create_leaves_nothing_behind(harness: Harness) -> None:
    """memory: an injected failure; local: a server that exits at start (no credentials);
    docker, kubernetes: an image that does not exist. Each raises SandboxError saying why,
    and no sandbox, record, process, container or new volume (claim) remains."""
    backend, spec, why = harness.failing(harness)
    with pytest.raises(SandboxError, match=why):
        await backend.create(spec)
    assert not await backend.exists(spec.sandbox_id)
    assert spec.sandbox_id not in {s.sandbox_id for s in await backend.list()}
    assert harness.traces(spec.sandbox_id, None) == []
    assert not (harness.volumes_on_engine and harness.volume_exists(spec.volume))
    await backend.aclose()


async def test_replicas_share_sandboxes_and_installations_do_not(harness: Harness) -> None:
    """A second backend object on the same engine (another gateway replica) lists,
    claims and deletes what the first made; a claim is taken once where the engine
    records it (docker labels cannot change: the claim only updates the record);
    another installation neither sees nor removes it."""
    first, second = harness.backend, harness.replica()
    spec = harness.spec(session_id=None)
    sandbox = await first.create(spec)
    assert sandbox in await second.list()
    assert await second.exists(spec.sandbox_id)

    claimed = await second.claim(sandbox, "claimed-1", "acme")
    assert claimed == replace(sandbox, session_id="claimed-1", tenant="acme")
    if harness.claims_recorded:
        assert await first.claim(sandbox, "claimed-2", "other") is None
        assert [s for s in await first.list() if s.sandbox_id == spec.sandbox_id] == [claimed]

    if harness.stranger is not None:
        stranger = harness.stranger()
        assert spec.sandbox_id not in {s.sandbox_id for s in await stranger.list()}
        assert not await stranger.exists(spec.sandbox_id)
        await stranger.delete(spec.sandbox_id)
        assert await first.exists(spec.sandbox_id)

    await second.delete(spec.sandbox_id)
    assert not await first.exists(spec.sandbox_id)
    assert await first.health(sandbox, spec.token) is Health.GONE
    await eventually(lambda: harness.traces(spec.sandbox_id, sandbox.pid) == [])


PROBE = """
import json, os, sys
import hosting
with open("probe.txt", "a") as f:
    f.write(sys.argv[1] + "\\n")
print(json.dumps({"cwd": os.getcwd(), "uid": os.getuid(), "given": os.environ.get("GIVEN"),
                  "data": os.environ.get("AGENT_DATA_DIR"), "argv": sys.argv[1:]}))
print("to stderr", file=sys.stderr)
sys.exit(3)
"""

BACKGROUND = """
import os, sys, time
open("started.txt", "w").write(os.environ["GIVEN"])
time.sleep(1.5)
open("finished.txt", "w").write("after the caller returned")
"""


async def test_commands_run_in_the_sandbox_as_its_user_in_its_data_dir(harness: Harness) -> None:
    """``run_command``: the sandbox's python with ``hosting`` importable, in its data dir,
    with the given environment (not in argv), as its user (the image's), with its exit
    status and both output streams; bounded by ``timeout``. ``start_command`` returns at
    once and its command goes on without the caller. Neither runs in a sandbox that is
    not running. The memory backend runs no commands and says so."""
    backend = harness.backend
    spec = harness.spec()
    sandbox = await backend.create(spec)
    await backend.wait_ready(sandbox, spec.token, READY_TIMEOUT)
    probe = ("python3", "-c", PROBE, "first word", "it's $HOME")
    if not harness.real:
        with pytest.raises(SandboxError, match="cannot run commands"):
            await backend.run_command(spec.sandbox_id, probe)
        with pytest.raises(SandboxError, match="cannot run commands"):
            await backend.start_command(spec.sandbox_id, probe)
        return

    result = await backend.run_command(spec.sandbox_id, probe, env={"GIVEN": "value with spaces"})
    assert result.exit_code == 3, result.output
    assert "to stderr" in result.output
    seen = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert seen["given"] == "value with spaces"
    assert seen["argv"] == ["first word", "it's $HOME"]
    assert seen["cwd"] == seen["data"]
    assert seen["uid"] == harness.command_uid

    again = await backend.run_command(spec.sandbox_id, ("python3", "-c", "print(open('probe.txt').read())"))
    assert (again.exit_code, again.output.strip()) == (0, "first word")
    with pytest.raises(SandboxError, match="did not end"):
        await backend.run_command(spec.sandbox_id, ("python3", "-c", "import time; time.sleep(30)"), timeout=1)

    started = time.monotonic()
    await backend.start_command(spec.sandbox_id, ("python3", "-c", BACKGROUND), env={"GIVEN": "in the background"})
    assert time.monotonic() - started < 1.5

    async def read(name: str) -> str | None:
        found = await backend.run_command(spec.sandbox_id, ("python3", "-c", f"print(open({name!r}).read())"))
        return found.output.strip() if found.exit_code == 0 else None

    deadline = time.monotonic() + 20
    while await read("finished.txt") is None:
        assert time.monotonic() < deadline, "the background command did not finish"
        await asyncio.sleep(0.2)
    assert await read("started.txt") == "in the background"

    await backend.delete(spec.sandbox_id)
    for call in (backend.run_command, backend.start_command):
        with pytest.raises(SandboxError):
            await call(spec.sandbox_id, ("python3", "-c", "pass"))


# --- what only some engines have ---------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("harness", ["local"], indirect=True)
async def test_local_sandbox_environment_is_an_allowlist(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's own secrets never reach a sandbox's server nor the CLIs it starts."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "admin-secret-value")
    monkeypatch.setenv("SOME_SECRET", "some-secret-value")
    spec = harness.spec()
    sandbox = await harness.backend.create(spec)
    assert sandbox.pid is not None
    environ = dict(entry.split("=", 1) for entry in
                   Path(f"/proc/{sandbox.pid}/environ").read_text().split("\0") if entry)
    expected = set(spec.server_env(host="127.0.0.1", port=0, data_dir="")) | {"HOME", SANDBOX_TAG}
    expected |= {name for name in ("PATH", "LANG", "LC_ALL") if name in os.environ}
    assert set(environ) == expected
    assert environ["HOME"] == environ["AGENT_DATA_DIR"]
    assert environ["AGENT_AUTH_TOKEN"] == spec.token
    await eventually(lambda: descendants(sandbox.pid or 0))  # the pre-started CLI
    for pid in descendants(sandbox.pid) | {sandbox.pid}:
        with suppress(FileNotFoundError):
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"admin-secret-value" not in raw and b"some-secret-value" not in raw
            assert b"GATEWAY_ADMIN_TOKEN" not in raw and b"SOME_SECRET" not in raw


GATEWAY = """
import asyncio, sys
from pathlib import Path
from hosting.sandboxes import SandboxSpec
from hosting.sandboxes.local import LocalBackend

async def main():
    spec = SandboxSpec(sys.argv[2], "vol-1", "token", {"ANTHROPIC_API_KEY": "unused"})
    sandbox = await LocalBackend(Path(sys.argv[1])).create(spec)
    print(sandbox.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.e2e
async def test_local_sandboxes_die_with_a_killed_gateway(tmp_path: Path) -> None:
    """The parent-death signal: a gateway killed by SIGKILL takes its sandboxes (and
    their CLIs) with it, and the next gateway's list prunes their records."""
    sandbox_id = f"conf-{secrets.token_hex(6)}"
    gateway = subprocess.Popen([sys.executable, "-c", GATEWAY, str(tmp_path), sandbox_id], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert gateway.stdout is not None
        pid = int(await asyncio.wait_for(asyncio.to_thread(gateway.stdout.readline), 60))
        assert pid in tagged_processes({sandbox_id})
        gateway.kill()
        gateway.wait(10)
        await eventually(lambda: not tagged_processes({sandbox_id}), timeout=10)
        assert await LocalBackend(tmp_path).list() == []
        assert list((tmp_path / "sandboxes").glob(f"{sandbox_id}.*")) == []
    finally:
        with suppress(ProcessLookupError):
            os.killpg(gateway.pid, signal.SIGKILL)
        gateway.wait(10)
        for leftover in tagged_processes({sandbox_id}):
            with suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)


async def test_local_record_whose_pid_was_reused_is_no_sandbox(tmp_path: Path) -> None:
    """A record's pid now belongs to another process (here: this test's own): it is not
    listed, not signalled by delete, and its record is pruned."""
    records = tmp_path / "sandboxes"
    records.mkdir()
    record = records / "conf-reused.json"

    def plant() -> None:
        record.write_text(json.dumps({
            "sandbox_id": "conf-reused", "volume": "vol-1", "session_id": None, "tenant": None,
            "pid": os.getpid(), "port": free_loopback_port(), "created_at": time.time(), "installation": "default"}))

    backend = LocalBackend(tmp_path)
    plant()
    assert not await backend.exists("conf-reused")
    assert await backend.list() == []
    assert not record.exists()
    plant()
    await backend.delete("conf-reused")  # this process is still here to see it
    assert not record.exists()


@contextmanager
def serving_anyone() -> Iterator[int]:
    """A server on a loopback port that answers every request 200, as a server started
    without a token does; its port."""

    class Anyone(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"ready": true}')

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Anyone) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join()


@pytest.mark.e2e
@pytest.mark.parametrize("harness", ["local"], indirect=True)
async def test_local_port_taken_before_the_server_binds_is_retried_a_bounded_number_of_times(
        harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process takes the sandbox's port between the pick and the bind, a server
    that answers 200 without a token: the sandbox's server exits, create never takes the
    stranger's answers for its own and tries another port; when every attempt loses, it
    gives up cleanly."""
    with serving_anyone() as port:
        monkeypatch.setattr("hosting.sandboxes.local.free_loopback_port", lambda: port)
        monkeypatch.setattr("hosting.sandboxes.local.BIND_ATTEMPTS", 1)
        lost = harness.spec()
        with pytest.raises(SandboxError, match="port was taken 1 times"):
            await harness.backend.create(lost)
        assert harness.traces(lost.sandbox_id, None) == []

        monkeypatch.undo()
        free = free_loopback_port()
        ports = iter([port, free])
        monkeypatch.setattr("hosting.sandboxes.local.free_loopback_port", lambda: next(ports))
        spec = harness.spec()
        sandbox = await harness.backend.create(spec)
    assert sandbox.address == f"http://127.0.0.1:{free}"
    assert await harness.backend.health(sandbox, spec.token) is Health.READY
    log = (tmp_path / "gateway-data" / "sandboxes" / f"{spec.sandbox_id}.log").read_text()
    assert "address already in use" in log.lower()


@pytest.mark.e2e
@pytest.mark.parametrize("harness", ["local"], indirect=True)
async def test_local_create_cancelled_midway_deletes_the_sandbox_that_comes_up(harness: Harness) -> None:
    """A caller that gives up while the server starts leaves no orphan: the start runs
    to its end (the volume it made stays, as after any create) and is then deleted."""
    spec = harness.spec()
    creating = asyncio.create_task(harness.backend.create(spec))
    await eventually(lambda: tagged_processes({spec.sandbox_id}))
    creating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await creating
    await eventually(lambda: not harness.traces(spec.sandbox_id, None) and harness.volume_exists(spec.volume),
                     timeout=60)
    assert not await harness.backend.exists(spec.sandbox_id)


@pytest.mark.modal
@pytest.mark.docker
@pytest.mark.e2e
@pytest.mark.parametrize("harness", ["modal"], indirect=True)
async def test_a_modal_sandbox_is_limited_and_its_server_sizes_itself_to_the_limit(harness: Harness) -> None:
    """The shared sandbox definition asks Modal for 1 GiB and 1 CPU as hard limits (the hosting
    guide's figures), so the server inside sees them and sizes its CLIs to 1 GiB (README: 3 at
    once); without a limit it would size itself to the whole worker. (A sandbox serves one
    session: the spec sets one warm session and one pre-started CLI.)"""
    spec = harness.spec()
    sandbox = await harness.backend.create(spec)
    await harness.backend.wait_ready(sandbox, spec.token, READY_TIMEOUT)
    async with httpx.AsyncClient(timeout=10) as client:  # trusts the tunnels' CA through SSL_CERT_FILE
        ready = (await client.get(f"{sandbox.address}/ready", headers=bearer(spec.token))).json()
    assert (ready["memory_limit_bytes"], ready["cpu_cores"]) == (1024**3, 1)
    assert ready["cli_budget"] == 3


@pytest.mark.docker
@pytest.mark.e2e
async def test_docker_bridge_sandbox_is_published_on_loopback_only_and_confined(agent_image: str) -> None:
    """With its own network the server is reached through a port the engine publishes
    on 127.0.0.1 only; the container runs as ``agent`` with no capabilities, the
    limits asked for and no restart policy, on a fresh volume ``agent`` can write."""
    import docker

    from hosting.sandboxes.docker import DockerBackend

    installation = f"t{secrets.token_hex(4)}"
    client = docker.from_env()
    backend = DockerBackend(agent_image, installation, network="bridge", memory_bytes=768 << 20,
                            nano_cpus=1_000_000_000, client=client)
    # No model is reached: the sandbox's own loopback stands in for the endpoint.
    spec = SandboxSpec(f"conf-{secrets.token_hex(6)}", f"vol-{secrets.token_hex(6)}", secrets.token_urlsafe(24),
                       {"ANTHROPIC_API_KEY": "unused", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}, SESSION, "acme")
    try:
        sandbox = await backend.create(spec)
        assert sandbox.address.startswith("http://127.0.0.1:")
        await backend.wait_ready(sandbox, spec.token, READY_TIMEOUT)
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{sandbox.address}/ready", headers=bearer("not-the-token"))).status_code == 401
        container = client.containers.get(f"agent-{spec.sandbox_id}")
        host_config = container.attrs["HostConfig"]
        assert host_config["NetworkMode"] in ("default", "bridge")
        assert host_config["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
        assert (host_config["Memory"], host_config["NanoCpus"]) == (768 << 20, 1_000_000_000)
        assert host_config["RestartPolicy"]["Name"] == "no" and host_config["CapDrop"] == ["ALL"]
        assert {k: v for k, v in container.labels.items() if k.startswith("research-agent.")} == {
            "research-agent.sandbox": spec.sandbox_id, "research-agent.installation": installation,
            "research-agent.volume": spec.volume, "research-agent.session": SESSION, "research-agent.tenant": "acme",
            "research-agent.created-at": repr(sandbox.created_at), "research-agent.port": "8000"}
        assert container.exec_run(["id", "-un"]).output == b"agent\n"
        assert container.exec_run(["stat", "-c", "%U", "/data"]).output == b"agent\n"
        volume = client.volumes.get(f"agent-vol-{spec.volume}")
        assert volume.attrs["Labels"]["research-agent.installation"] == installation
        assert [s for s in await backend.list() if s.sandbox_id == spec.sandbox_id] == [sandbox]
        await backend.delete(spec.sandbox_id)
        assert await backend.health(sandbox, spec.token) is Health.GONE
        await backend.delete_volume(spec.volume)
    finally:
        remove_docker_installation(installation)
        client.close()


def test_docker_backend_without_the_sdk_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['docker'] = None\n"
            "from hosting.sandboxes import SandboxError\n"
            "from hosting.sandboxes.docker import DockerBackend\n"
            "try:\n    DockerBackend('research-agent')\nexcept SandboxError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == 'the docker backend needs the Docker SDK: pip install "research-agent-hosting[docker]"'


async def test_memory_wait_ready_wakes_on_set_health_and_kill() -> None:
    """The memory backend's engine helpers, as the gateway's unit tests use them."""
    backend = MemoryBackend()
    spec = SandboxSpec("mem-1", "vol-1", "token", {}, SESSION, "acme")
    sandbox = await backend.create(spec)
    backend.set_health(spec.sandbox_id, Health.STARTING)
    waiting = asyncio.create_task(backend.wait_ready(sandbox, spec.token, 30))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    backend.set_health(spec.sandbox_id, Health.READY)
    await asyncio.wait_for(waiting, 1)

    backend.set_health(spec.sandbox_id, Health.STARTING)
    waiting = asyncio.create_task(backend.wait_ready(sandbox, spec.token, 30))
    await asyncio.sleep(0.05)
    backend.kill(spec.sandbox_id)
    with pytest.raises(SandboxError, match="exited before it was ready"):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(SandboxError, match="not ready after"):
        await backend.wait_ready(await backend.create(replace(spec, sandbox_id="mem-2", token="other")), "wrong", 0.1)
    backend.fail_next_create()
    with pytest.raises(SandboxError):
        await backend.create(replace(spec, sandbox_id="mem-3"))
    assert (backend.creates, backend.deletes, backend.volumes) == (2, 0, {"vol-1"})
    await backend.delete("mem-1")
    assert backend.deletes == 1


@pytest.mark.parametrize("field_name, value", [
    ("sandbox_id", "Upper"), ("sandbox_id", "-lead"), ("sandbox_id", "trail-"), ("sandbox_id", "x" * 41),
    ("sandbox_id", "../x"), ("volume", ".."), ("volume", "a/b"), ("volume", ""), ("token", ""), ("token", "a b"),
])
def test_a_spec_refuses_names_no_engine_could_hold_and_an_empty_token(field_name: str, value: str) -> None:
    """Checked once, in the spec: an id or volume becomes a path, a container name and a
    label; an empty token would start a server that serves anyone."""
    valid = SandboxSpec("ok-1", "vol-1", "token")
    change: dict[str, Any] = {field_name: value}
    with pytest.raises(ValueError):
        replace(valid, **change)
