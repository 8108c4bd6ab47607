"""The launcher of commands in a sandbox (``hosting.sandboxes.launch``), and the kubernetes
backend's commands through it.

The request codec is pure logic, tested as such in tests/unit/test_launch_requests.py. The
launcher itself runs as a real process here, as a backend runs it. The kubernetes part drives the real client library's pods
``exec`` against the stand-in of the pods API (tests/standins/k8s.py), whose pods run the real
server: what the conformance suite cannot see from the interface (that the secret travels on
stdin and never in the exec URL or a command line, that a command nobody waits for any more
is killed, that the stand-in refuses what it does not serve) is checked here.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes.aio.client import Configuration, CoreV1Api
from kubernetes.aio.config import load_kube_config
from kubernetes.aio.stream import WsApiClient

from hosting.sandboxes import SandboxError, SandboxSpec
from hosting.sandboxes.kubernetes import KubernetesBackend, pod_name
from hosting.sandboxes.launch import CANNOT_START, FAILED, encode_request
from tests.standins.k8s import POD_TEMPLATE, PodsApiStandIn, running_standin
from tests.support import ROOT
from tests.support.polling import wait_for, wait_for_async

LAUNCH = (sys.executable, "-m", "hosting.sandboxes.launch")


# --- the launcher as a process -----------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    made = tmp_path / "data"
    made.mkdir()
    return made


def launcher(data_dir: Path) -> subprocess.Popen[bytes]:
    """The launcher as a backend starts it: the sandbox's environment, stdin kept open."""
    env = {**os.environ, "AGENT_DATA_DIR": str(data_dir)}
    return subprocess.Popen(LAUNCH, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def launched(data_dir: Path, request: bytes, *, close_stdin: bool = False) -> tuple[int, str]:
    process = launcher(data_dir)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(request)
        process.stdin.flush()
        if close_stdin:
            process.stdin.close()
        output = process.stdout.read()
        return process.wait(30), output.decode()
    finally:
        process.kill()
        process.wait()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_command_runs_in_the_data_dir_with_the_env_and_its_status(data_dir: Path) -> None:
    probe = ("import json, os, sys; print(json.dumps([os.getcwd(), os.environ['GIVEN'], sys.stdin.read()]));"
             "print('err', file=sys.stderr); sys.exit(4)")
    code, output = launched(data_dir, encode_request([sys.executable, "-c", probe], {"GIVEN": "a value"}, detach=False))
    assert code == 4
    assert json.loads(output.splitlines()[0]) == [str(data_dir), "a value", ""]  # stdin: /dev/null, not the request's
    assert "err" in output


def test_a_command_is_killed_when_the_callers_stream_closes(data_dir: Path) -> None:
    """Closing the launcher's stdin (the exec stream went: a timeout, a crash) ends the
    command and the processes it started, at once."""
    started = data_dir / "pids"
    code = f"import os, subprocess, time; child = subprocess.Popen(['sleep', '60']); " \
           f"open({str(started)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); time.sleep(60)"
    process = launcher(data_dir)
    try:
        assert process.stdin is not None
        process.stdin.write(encode_request([sys.executable, "-c", code], None, detach=False))
        process.stdin.flush()
        wait_for(lambda: process.poll() is not None or (started.exists() and len(started.read_text().split()) == 2),
                 timeout=20, interval=0.02)
        assert process.poll() is None, "the command did not start"
        pids = [int(pid) for pid in started.read_text().split()]
        assert all(alive(pid) for pid in pids)
        process.stdin.close()
        assert process.wait(10) == 137
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10, interval=0.02)  # it did not outlive its caller
    finally:
        process.kill()
        process.wait()


def test_a_detached_command_runs_on_in_a_session_of_its_own(data_dir: Path) -> None:
    code, output = launched(data_dir, encode_request(["sleep", "30"], None, detach=True), close_stdin=True)
    pid = int(output)
    try:
        assert code == 0
        assert alive(pid) and os.getsid(pid) == pid
    finally:
        os.kill(pid, 9)


@pytest.mark.parametrize("request_line", [
    encode_request(["no-such-command-here"], None, detach=False),
    encode_request(["no-such-command-here"], None, detach=True),
    b'{"argv": []}\n',
])
def test_what_cannot_start_says_why_and_starts_nothing(data_dir: Path, request_line: bytes) -> None:
    code, output = launched(data_dir, request_line)
    assert code == CANNOT_START
    assert output.startswith(FAILED) and output.count("\n") == 1, output


# --- the kubernetes backend's commands ---------------------------------------------------------

@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodsApiStandIn]:
    with running_standin(tmp_path_factory.mktemp("standin")) as made:
        yield made


@dataclass
class Pod:
    backend: KubernetesBackend
    sandbox_id: str
    kubeconfig: Path


@pytest.fixture(scope="module")
async def pod(standin: PodsApiStandIn, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    """One backend and one running sandbox (a server that takes no turns) for the module;
    once deleted, nothing of it runs, its detached commands included."""
    kubeconfig = standin.kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    backend = KubernetesBackend(POD_TEMPLATE, standin.namespace, f"t{secrets.token_hex(4)}", kubeconfig=kubeconfig)
    spec = SandboxSpec(f"cmd-{secrets.token_hex(5)}", "vol-cmd", secrets.token_urlsafe(24),
                       {"ANTHROPIC_API_KEY": "unused", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}, prewarm=False)
    try:
        await backend.create(spec)
        yield Pod(backend, spec.sandbox_id, kubeconfig)
    finally:
        try:
            await backend.delete(spec.sandbox_id)
            assert standin.traces(pod_name(spec.sandbox_id)) == []
        finally:
            await backend.aclose()


def command_lines() -> dict[int, str]:
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found[int(cmdline.parent.name)] = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def environment_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


@pytest.mark.kubernetes
async def test_the_secret_goes_on_stdin_never_in_the_exec_url_or_a_command_line(
        pod: Pod, standin: PodsApiStandIn) -> None:
    k8s, sandbox_id = pod.backend, pod.sandbox_id
    secret = f"secret-{secrets.token_hex(8)}"
    marker = f"marker-{secrets.token_hex(4)}"
    before = len(standin.exec_urls)
    await k8s.start_command(sandbox_id, ("python3", "-c", f"import time; time.sleep(60)  # {marker}"), {"TOKEN": secret})
    running = [pid for pid, line in command_lines().items() if marker in line]
    assert len(running) == 1, running
    assert f"TOKEN={secret}" in environment_of(running[0])  # it arrived
    assert not [line for line in command_lines().values() if secret in line]
    urls = standin.exec_urls[before:]
    assert len(urls) == 1 and "command=python3&command=-m&command=hosting.sandboxes.launch&" in urls[0]
    assert secret not in urls[0] and marker not in urls[0]
    assert {("get", "pods/exec"), ("create", "pods/exec")} <= standin.verbs

    result = await k8s.run_command(sandbox_id, ("python3", "-c", "import os; print(os.environ['TOKEN'])"),
                                   {"TOKEN": secret})
    assert (result.exit_code, result.output.strip()) == (0, secret)
    assert all(secret not in url for url in standin.exec_urls)


@pytest.mark.kubernetes
async def test_a_command_that_times_out_is_killed(pod: Pod) -> None:
    k8s, sandbox_id = pod.backend, pod.sandbox_id
    marker = f"marker-{secrets.token_hex(4)}"
    with pytest.raises(SandboxError, match="did not end within 1 s"):
        await k8s.run_command(sandbox_id, ("python3", "-c", f"import time; time.sleep(60)  # {marker}"), timeout=1)
    await wait_for_async(lambda: not [pid for pid, line in command_lines().items() if marker in line and alive(pid)],
                         timeout=10, interval=0.05)  # the timed-out command does not run on


@pytest.mark.kubernetes
async def test_commands_only_in_this_installations_running_pods_and_only_ones_that_start(
        pod: Pod, standin: PodsApiStandIn, tmp_path: Path) -> None:
    k8s, sandbox_id = pod.backend, pod.sandbox_id
    with pytest.raises(SandboxError, match="no-such-command"):
        await k8s.run_command(sandbox_id, ("no-such-command",))
    with pytest.raises(SandboxError, match="no-such-command"):
        await k8s.start_command(sandbox_id, ("no-such-command",))
    before = len(standin.exec_urls)
    with pytest.raises(ValueError, match="argv"):
        await k8s.run_command(sandbox_id, ())
    stranger = KubernetesBackend(POD_TEMPLATE, standin.namespace, "someone-else",
                                 kubeconfig=standin.kubeconfig(tmp_path / "config"))
    try:
        for backend, target in ((stranger, sandbox_id), (k8s, "no-such-sandbox")):
            for call in (backend.run_command, backend.start_command):
                with pytest.raises(SandboxError, match="is not running"):
                    await call(target, ("python3", "-c", "pass"))
    finally:
        await stranger.aclose()
    assert len(standin.exec_urls) == before  # refused before any exec


@pytest.mark.kubernetes
async def test_the_standin_refuses_an_exec_it_does_not_serve(pod: Pod, standin: PodsApiStandIn) -> None:
    """As the API does (400, 404 as a plain HTTP answer to the upgrade), and what the
    backend never sends (a TTY, another container) is recorded as unexpected."""
    sandbox_id = pod.sandbox_id
    configuration = Configuration()
    await load_kube_config(config_file=str(pod.kubeconfig), client_configuration=configuration)
    streams = WsApiClient(configuration)
    api = CoreV1Api(streams)
    cases: list[tuple[dict[str, Any], int, bool]] = [
        ({"tty": True}, 400, True), ({"container": "sidecar"}, 400, True), ({"command": []}, 400, True),
        ({"name": "agent-no-such-pod"}, 404, False)]
    try:
        for change, code, unexpected in cases:
            arguments: dict[str, Any] = {"name": pod_name(sandbox_id), "namespace": standin.namespace, "command": ["true"],
                         "container": "server", "stdin": False, "stdout": True, "stderr": True, "tty": False, **change}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with await api.connect_get_namespaced_pod_exec_without_preload_content(**arguments):
                    pass
            assert refused.value.status == code
            if unexpected:
                assert len(standin.unexpected) == 1, standin.unexpected
                standin.unexpected.clear()
    finally:
        await streams.close()
    assert standin.unexpected == []
