"""Self-hosted environments on the kubernetes backend: the real orchestrator makes a pod per
session through the stand-in of the pods API (``tests/standins/k8s.py``), whose kubelet runs
each pod's server as a real local process, and starts the real SDK worker in it through the
``exec`` subresource (``python3 -m hosting.sandboxes.launch``, the command on its stdin).

Proves: every tool runs in the session's directory in its own pod and its result reaches the
service; a second session gets a pod of its own whose ``/data`` holds none of the first one's
files; the environment key is in no pod process's environment (the runner's included, seen
while it runs), in no pod's files and in no exec URL, which carry no work secret either; the
pods API saw only the calls it serves, within what the README grants the orchestrator; a
runner killed in its pod is told from a live one (``runner status`` over ``exec``) and
replaced on the re-delivered item. The pods are made from the runner pod template
(``component: runner``, the runner NetworkPolicy's), and the orchestrator refuses the
agents' template.

The stand-in's pods share this machine's filesystem and user, so a pod here could read
another's files by their host path; what it cannot do in a cluster is not shown here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from hosting.environments.sandboxes import sandbox_name
from hosting.environments.settings import EnvironmentSettings
from hosting.sandboxes import launch
from hosting.sandboxes.kubernetes import pod_name
from hosting.settings_env import ConfigError
from tests.integration.test_environments import ENVIRONMENT_KEY, TOOLS, TURN_SECONDS, assert_every_tool_ran
from tests.standins.environments import EnvironmentStandIn, OrchestratorProcess, orchestrator_env, serve
from tests.standins.k8s import POD_TAG, POD_TEMPLATE, PodsApiStandIn, running_standin
from tests.support.polling import wait_for

pytestmark = pytest.mark.kubernetes

NAMESPACE = "agents"
ORCHESTRATOR_GRANTS = {*((verb, "pods") for verb in ("create", "get", "list", "patch", "delete")),
                       ("get", "pods/exec"), ("create", "pods/exec")}
"""What hosting/environments/README.md says the orchestrator's service account needs."""
RUNNER_POD_TEMPLATE = POD_TEMPLATE.with_name("runner-pod-template.yaml")


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodsApiStandIn]:
    with running_standin(tmp_path_factory.mktemp("pods"), namespace=NAMESPACE) as made:
        yield made


@pytest.fixture(scope="module")
def standin() -> Iterator[EnvironmentStandIn]:
    yield from serve(EnvironmentStandIn(environment_key=ENVIRONMENT_KEY, lease_ttl=10))  # a killed runner's lease lapses soon


@pytest.fixture(scope="module")
def orchestrator(standin: EnvironmentStandIn, pods: PodsApiStandIn,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    """The orchestrator on the kubernetes backend; its process group is killed at the end,
    before the pods stand-in (which kills every pod's processes) stops."""
    root = tmp_path_factory.mktemp("orchestrator")
    key_file = root / "environment.key"
    key_file.write_text(ENVIRONMENT_KEY)
    env = orchestrator_env(standin, root / "data", key_file, f"tk{secrets.token_hex(4)}",
                           ENVIRONMENT_BACKEND="kubernetes", ENVIRONMENT_KUBERNETES_NAMESPACE=NAMESPACE,
                           ENVIRONMENT_KUBERNETES_POD_TEMPLATE=str(RUNNER_POD_TEMPLATE),
                           ENVIRONMENT_KUBECONFIG=str(pods.kubeconfig(root / "kubeconfig")))
    process = OrchestratorProcess(env, root / "orchestrator.log")
    try:
        yield process.start()
    finally:
        process.stop()


def pod_of(standin: EnvironmentStandIn, session_id: str) -> str:
    return pod_name(sandbox_name(standin.environment_id, session_id))


def pod_environs(name: str) -> dict[int, dict[str, str]]:
    """The environment of every live process of pod ``name`` (its :data:`POD_TAG` ends in it)."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = path.read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)
        if env.get(POD_TAG, "").endswith(f"/{name}"):
            found[int(path.parent.name)] = env
    return found


def data_dir(pods: PodsApiStandIn, name: str) -> Path:
    """Where the pod's ``/data`` is on this machine: its server's ``AGENT_DATA_DIR``."""
    process = pods.process(name)
    assert process is not None, f"pod {name} runs no server"
    return Path(pod_environs(name)[process.pid]["AGENT_DATA_DIR"])


def serve_turn(standin: EnvironmentStandIn, session_id: str, orchestrator: OrchestratorProcess) -> dict[int, dict[str, str]]:
    """Wait for the session's turn, sampling its pod's processes meanwhile (the runner lives
    only while it serves); every environment seen, by pid."""
    seen: dict[int, dict[str, str]] = {}
    name = pod_of(standin, session_id)
    deadline = time.monotonic() + TURN_SECONDS
    while not standin.turn_done(session_id):
        if time.monotonic() > deadline:
            raise AssertionError(f"turn of {session_id} not done; orchestrator log:\n{orchestrator.log()[-4000:]}")
        seen.update(pod_environs(name))
        time.sleep(0.05)
    return seen


def test_sessions_run_in_their_own_pods_without_the_key(standin: EnvironmentStandIn, pods: PodsApiStandIn,
                                                        orchestrator: OrchestratorProcess) -> None:
    first = standin.create_session(TOOLS)
    first_seen = serve_turn(standin, first, orchestrator)
    first_pod = pod_of(standin, first)
    home = data_dir(pods, first_pod) / "workspace" / first
    second = standin.create_session([("bash", {"command": f'cat "$AGENT_DATA_DIR/workspace/{first}/notes.txt"'}),
                                     ("glob", {"pattern": "*.txt"}), ("read", {"file_path": str(home / "notes.txt")}),
                                     ("bash", {"command": "pwd"})])
    second_seen = serve_turn(standin, second, orchestrator)

    second_pod = pod_of(standin, second)
    assert {first_pod, second_pod} <= pods.pod_names() and first_pod != second_pod
    for session, name in ((first, first_pod), (second, second_pod)):
        assert (pods.pod(name) or {})["metadata"]["annotations"]["research-agent/session-id"] == session
        assert (pods.pod(name) or {})["metadata"]["labels"]["app.kubernetes.io/component"] == "runner"
    assert data_dir(pods, first_pod) != data_dir(pods, second_pod)

    assert_every_tool_ran(standin, first, home)

    other = standin.results(second)
    assert other[0][:2] == ("bash", True) and "No such file" in other[0][2], other
    assert other[1] == ("glob", False, "no matches")
    assert other[2][:2] == ("read", True) and "outside the session's working directory" in other[2][2], other
    assert other[3] == ("bash", False, str(data_dir(pods, second_pod) / "workspace" / second))

    # The key is in no pod process (each runner seen while it served), no pod's files, no exec request.
    for session, seen in ((first, first_seen), (second, second_seen)):
        (item,) = standin.items_of(session)
        assert any(env.get("ANTHROPIC_WORK_SECRET") == item.secret() for env in seen.values()), "no runner seen"
        for pid, env in seen.items():
            assert ENVIRONMENT_KEY not in "\0".join(f"{k}={v}" for k, v in env.items()), pid
    for directory in (data_dir(pods, first_pod), data_dir(pods, second_pod)):
        for path in directory.rglob("*"):
            if path.is_file():
                assert ENVIRONMENT_KEY.encode() not in path.read_bytes(), path
    items = [item for session in (first, second) for item in standin.items_of(session)]
    assert pods.exec_urls
    for url in pods.exec_urls:
        assert parse_qs(urlsplit(url).query)["command"] == list(launch.COMMAND), url
        assert ENVIRONMENT_KEY not in url and not any(item.secret() in url for item in items), url
    for call in standin.calls:
        if call.route in ("heartbeat", "events.list", "events.stream", "events.send"):
            assert call.credential.startswith("sessions_token:"), call
    assert ENVIRONMENT_KEY not in orchestrator.log()
    assert {("get", "pods/exec"), ("create", "pods/exec")} <= pods.verbs <= ORCHESTRATOR_GRANTS
    assert pods.unexpected == []


def test_a_runner_killed_in_its_pod_is_replaced(standin: EnvironmentStandIn, pods: PodsApiStandIn,
                                                orchestrator: OrchestratorProcess) -> None:
    """The orchestrator reads the runner's record over ``exec`` (``runner status``): a dead
    runner is told from a live one, and the re-delivered item gets a new one in the same pod."""
    session = standin.create_session([("bash", {"command": "sleep 2; echo slept"}),
                                      ("write", {"file_path": "after.txt", "content": "done"})])
    (item,) = standin.items_of(session)
    wait_for(lambda: standin.item(item.id).state == "active", timeout=TURN_SECONDS, interval=0.1)
    name = pod_of(standin, session)
    data = data_dir(pods, name)
    record = data / "environment" / "runner.json"
    first_runner = int(json.loads(record.read_text())["pid"])
    assert first_runner in pod_environs(name)
    os.kill(first_runner, signal.SIGKILL)  # a process of the pod this test's stand-in started

    serve_turn(standin, session, orchestrator)
    assert item.id in standin.requeued and standin.item(item.id).deliveries == 2
    assert [(n, e) for n, e, _ in standin.results(session)] == [("bash", False), ("write", False)]
    assert json.loads(record.read_text())["pid"] != first_runner
    assert pod_of(standin, session) in pods.pod_names()
    assert (data / "workspace" / session / "after.txt").read_text() == "done"
    assert pods.verbs <= ORCHESTRATOR_GRANTS
    assert pods.unexpected == []



def test_the_orchestrator_refuses_the_agents_pod_template() -> None:
    """Runner pods labelled as agent pods would reach the egress proxy's key port: the
    orchestrator does not start with a template whose pods are not ``component: runner``."""
    env = {"ANTHROPIC_ENVIRONMENT_ID": "env_01", "ANTHROPIC_ENVIRONMENT_KEY": "k", "ENVIRONMENT_BACKEND": "kubernetes"}
    with pytest.raises(ConfigError, match="ENVIRONMENT_KUBERNETES_POD_TEMPLATE: .*component: runner .*'sandbox'"):
        EnvironmentSettings.from_env({**env, "ENVIRONMENT_KUBERNETES_POD_TEMPLATE": str(POD_TEMPLATE)})
    settings = EnvironmentSettings.from_env({**env, "ENVIRONMENT_KUBERNETES_POD_TEMPLATE": str(RUNNER_POD_TEMPLATE)})
    assert settings.sandboxes.kubernetes_pod_template == RUNNER_POD_TEMPLATE
