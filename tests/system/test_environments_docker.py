"""Self-hosted environments on the docker backend: the real orchestrator starts a container
of the product image per session (host network: it reaches the stand-in on 127.0.0.1) and
the real SDK worker runs in it through ``docker exec``.

Proves: every tool runs in the session's directory inside its own container; a second
session's container cannot see the first one's files, even with bash; the environment key
is not in the containers' environments nor in their files; a runner killed in its container
is replaced on the re-delivered item.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hosting.environments.sandboxes import sandbox_name
from hosting.sandboxes.docker import DockerBackend, container_name
from tests.integration.test_environments import ENVIRONMENT_KEY, TOOLS, wait_turn
from tests.standins.environments import EnvironmentStandIn, OrchestratorProcess, orchestrator_env, serve
from tests.support.images import docker
from tests.support.polling import wait_for

# The first test to ask for the product image builds it (minutes on a busy machine).
pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(600)]


@pytest.fixture
def standin() -> Iterator[EnvironmentStandIn]:
    yield from serve(EnvironmentStandIn(environment_key=ENVIRONMENT_KEY, lease_ttl=10))


@pytest.fixture
def orchestrator(standin: EnvironmentStandIn, agent_image: str, tmp_path: Path) -> Iterator[OrchestratorProcess]:
    key_file = tmp_path / "environment.key"
    key_file.write_text(ENVIRONMENT_KEY)
    installation = f"td{secrets.token_hex(4)}"
    env = orchestrator_env(standin, tmp_path / "data", key_file, installation, ENVIRONMENT_BACKEND="docker",
                           ENVIRONMENT_DOCKER_IMAGE=agent_image, ENVIRONMENT_DOCKER_NETWORK="host")
    process = OrchestratorProcess(env, tmp_path / "orchestrator.log")
    try:
        yield process.start()
    finally:
        process.stop()
        backend = DockerBackend(agent_image, installation=installation)
        try:
            asyncio.run(backend.remove_installation())
        finally:
            asyncio.run(backend.aclose())


def container_of(standin: EnvironmentStandIn, session_id: str) -> str:
    return container_name(sandbox_name(standin.environment_id, session_id))


def test_sessions_run_in_their_own_containers_without_the_key(standin: EnvironmentStandIn,
                                                              orchestrator: OrchestratorProcess) -> None:
    first = standin.create_session(TOOLS)
    wait_turn(standin, first, orchestrator, timeout=180)
    second = standin.create_session([("bash", {"command": f"cat /data/workspace/{first}/notes.txt"}),
                                     ("bash", {"command": "pwd"})])
    wait_turn(standin, second, orchestrator, timeout=180)

    home = f"/data/workspace/{first}"
    texts = {name: (error, text) for name, error, text in standin.results(first)}
    assert all(not error for error, _ in texts.values()), texts
    assert texts["read"][1] == "alpha\nbeta\n"
    assert texts["glob"][1] == f"{home}/notes.txt"
    assert texts["grep"][1] == f"{home}/notes.txt:2:gamma"
    bash_lines = texts["bash"][1].splitlines()
    assert bash_lines[:3] == [home, "alpha", "gamma"]
    assert "ANTHROPIC_WORK_SECRET" in bash_lines and "ANTHROPIC_ENVIRONMENT_KEY" not in bash_lines

    other = standin.results(second)
    assert other[0][0] == "bash" and other[0][1] is True and "No such file" in other[0][2]
    assert other[1] == ("bash", False, f"/data/workspace/{second}")

    for session in (first, second):
        name = container_of(standin, session)
        config_env = docker("inspect", "--format", "{{json .Config.Env}}", name).stdout
        assert ENVIRONMENT_KEY not in config_env
        assert docker("exec", name, "id", "-u").stdout.strip() != "0"
        found = docker("exec", name, "grep", "-rl", ENVIRONMENT_KEY, "/data", check=False)
        assert found.returncode == 1 and not found.stdout, found.stdout
    assert ENVIRONMENT_KEY not in orchestrator.log()


def test_a_runner_killed_in_its_container_is_replaced(standin: EnvironmentStandIn,
                                                      orchestrator: OrchestratorProcess) -> None:
    session = standin.create_session([("bash", {"command": "sleep 2; echo slept"}),
                                      ("write", {"file_path": "after.txt", "content": "done"})])
    (item,) = standin.items_of(session)
    wait_for(lambda: standin.item(item.id).state == "active", timeout=120, interval=0.2)
    name = container_of(standin, session)
    status = docker("exec", name, "python3", "-m", "hosting.environments.runner", "status").stdout
    pid = int(json.loads(status)["pid"])
    docker("exec", name, "python3", "-c", f"import os; os.kill({pid}, {int(signal.SIGKILL)})")

    wait_turn(standin, session, orchestrator, timeout=180)
    assert item.id in standin.requeued
    assert [(n, e) for n, e, _ in standin.results(session)] == [("bash", False), ("write", False)]
    assert docker("exec", name, "cat", f"/data/workspace/{session}/after.txt").stdout == "done"
