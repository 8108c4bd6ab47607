"""A lone server is safe by default: no open port to a network by accident, no answer to a
DNS-rebinding page on loopback, no API page that loads another origin's scripts.

Refusals need no CLI (the server exits before it serves); the Host rule is checked on a
real uvicorn server (headers as a browser would send them); the settings' rules and the API
page in process, in tests/unit/test_safe_settings.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT
from tests.support.servers import LocalModel, ServerProcess, agent_env

ONE_LINE_REFUSAL = ("AGENT_AUTH_TOKEN", "AGENT_ALLOW_UNAUTHENTICATED")


def run_server(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hosting.server"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_off_loopback_without_a_token_the_server_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_"))}
    proc = run_server({**env, "ANTHROPIC_API_KEY": "x", "AGENT_DATA_DIR": str(tmp_path), "HOST": "0.0.0.0",
                       "PORT": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agent-server: HOST=0.0.0.0 "), proc.stderr
    assert all(name in lines[0] for name in ONE_LINE_REFUSAL)


@pytest.mark.parametrize("opening", [{"AGENT_ALLOW_UNAUTHENTICATED": "1"}, {"AGENT_AUTH_TOKEN": "tok-3f1c"}],
                         ids=["opt-out", "token"])
def test_off_loopback_with_the_opt_out_or_a_token_the_server_starts(opening: dict[str, str], start_server) -> None:
    server = start_server(HOST="0.0.0.0", AGENT_PREWARM="0", **opening)  # reached on 127.0.0.1, as every test does
    ready = httpx.get(f"{server.base_url}/ready", headers={"host": "agent.example:8000"})
    # Off loopback no Host rule applies (a token, or the operator's choice, guards it).
    assert ready.status_code == (401 if "AGENT_AUTH_TOKEN" in opening else 200)


@pytest.fixture(scope="module")
def loopback_server(local_model: LocalModel, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("loopback") / "data"
    server = ServerProcess(agent_env(local_model, data_dir, AGENT_PREWARM="0"), data_dir).start()
    yield server
    server.stop()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil",
                                  "evil@localhost:{port}", "0.0.0.0:{port}", "192.0.2.1:{port}"])
def test_a_loopback_server_refuses_other_host_names_with_421(host: str, loopback_server) -> None:
    for path in ("/health", "/", "/ready", "/sessions/s1"):
        response = httpx.get(f"{loopback_server.base_url}{path}",
                             headers={"host": host.format(port=loopback_server.port)})
        assert response.status_code == 421, (path, response.text)
        assert "loopback" in response.json()["detail"]
    posted = httpx.post(f"{loopback_server.base_url}/sessions/s1/messages", json={"prompt": "hi"},
                        headers={"host": host.format(port=loopback_server.port)})
    assert posted.status_code == 421


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "127.9.8.7:{port}",
                                  "[::1]:{port}", "localhost"])
def test_a_loopback_server_answers_loopback_host_names(host: str, loopback_server) -> None:
    headers = {"host": host.format(port=loopback_server.port)}
    assert httpx.get(f"{loopback_server.base_url}/ready", headers=headers).status_code == 200
    assert httpx.get(f"{loopback_server.base_url}/", headers=headers).status_code == 200  # the chat page


def test_the_api_pages_are_off_by_default(loopback_server) -> None:
    for path in ("/docs", "/redoc", "/docs/swagger-ui-bundle.js", "/docs/oauth2-redirect"):
        assert httpx.get(f"{loopback_server.base_url}{path}").status_code == 404, path
