"""A missing optional driver is one clear start-up error naming the extra, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "GATEWAY_", "ANTHROPIC_", "MODAL_"))}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def run_without(module: str, entry: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``entry``'s ``main()`` as if ``module`` were not installed."""
    return run(f"import sys; sys.modules[{module!r}] = None\nfrom {entry} import main\nmain()", env)


def run_script_without(module: str, script: str) -> subprocess.CompletedProcess[str]:
    """``python <script>`` as if ``module`` were not installed."""
    return run(f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = [{script!r}]\n"
               f"runpy.run_path({script!r}, run_name='__main__')", {})


def test_a_postgres_store_without_the_stores_extra(tmp_path: Path) -> None:
    proc = run_without("psycopg", "hosting.server.app", {
        "AGENT_SESSION_STORE": "postgresql://user:secret-pw@127.0.0.1:1/db", "ANTHROPIC_API_KEY": "x",
        "AGENT_DATA_DIR": str(tmp_path), "PORT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "research-agent-hosting[stores]"' in proc.stderr
    assert "Traceback" not in proc.stderr and "secret-pw" not in proc.stderr


def test_the_docker_backend_without_the_docker_extra(tmp_path: Path) -> None:
    proc = run_without("docker", "hosting.gateway.app", {
        "GATEWAY_BACKEND": "docker", "GATEWAY_TENANTS": "t:alice", "ANTHROPIC_API_KEY": "x",
        "GATEWAY_DATA_DIR": str(tmp_path), "PORT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "research-agent-hosting[docker]"' in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["hosting/modal/modal_app.py", "hosting/modal/teardown.py"])
def test_the_modal_scripts_without_the_modal_extra(script: str) -> None:
    proc = run_script_without("modal", script)
    name = Path(script).stem
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f'{name}: the Modal client is not installed: pip install "research-agent-hosting[modal]"\n'


def test_the_orchestrator_without_the_environments_extra() -> None:
    proc = run_without("anthropic", "hosting.environments.__main__", {})
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ('agent-environment-orchestrator: the orchestrator needs the Anthropic SDK: '
                           'pip install "research-agent-hosting[environments]"\n')


def test_modal_backend_without_the_client_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['modal'] = None\n"
            "from hosting.sandboxes import SandboxError\n"
            "from hosting.sandboxes.modal import ModalBackend\n"
            "try:\n    ModalBackend()\nexcept SandboxError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == 'the Modal client is not installed: pip install "research-agent-hosting[modal]"'


def test_the_modal_backend_without_modal_credentials_refuses_to_start(tmp_path: Path) -> None:
    """Modal would fail only at its first call, in the background, again and again: refuse at start-up."""
    proc = run("from hosting.gateway.app import main\nmain()", {
        "GATEWAY_BACKEND": "modal", "GATEWAY_TENANTS": "t:alice", "ANTHROPIC_API_KEY": "x", "HOME": str(tmp_path),
        "MODAL_CONFIG_PATH": str(tmp_path / "none.toml"), "GATEWAY_DATA_DIR": str(tmp_path), "PORT": "1"})
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("agent-gateway: no Modal credentials: run `modal setup` or set MODAL_TOKEN_ID and "
                           "MODAL_TOKEN_SECRET\n")


def test_the_docker_readme_names_the_extras_the_image_installs() -> None:
    installed = re.search(r'pip install [^\n]*"\.\[([a-z,]+)\]"', (ROOT / "hosting/Dockerfile").read_text())
    said = re.search(r"with the ((?:`\w+`(?:,\s+|\s+and\s+)?)+) extras", (ROOT / "hosting/docker/README.md").read_text())
    assert installed and said
    assert set(re.findall(r"`(\w+)`", said.group(1))) == set(installed.group(1).split(","))
