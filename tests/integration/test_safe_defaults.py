"""A lone server is safe by default: no open port to a network by accident, no answer to a
DNS-rebinding page on loopback, no API page that loads another origin's scripts.

Refusals need no CLI (the server exits before it serves); the Host rule is checked on a
real uvicorn server (headers as a browser would send them); the API page in process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, LocalModel, ServerProcess, agent_env

from hosting.server.app import create_app
from hosting.server.settings import Settings
from hosting.settings_env import ConfigError

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


@pytest.mark.parametrize(("env", "refused"), [
    ({}, True),  # the default HOST is 0.0.0.0
    ({"HOST": "::"}, True), ({"HOST": "192.0.2.1"}, True), ({"HOST": "agent.internal"}, True),
    ({"AGENT_ALLOW_UNAUTHENTICATED": "0"}, True), ({"AGENT_AUTH_TOKEN": " "}, True),
    ({"AGENT_ALLOW_UNAUTHENTICATED": "1"}, False), ({"AGENT_AUTH_TOKEN": "t"}, False),
    ({"HOST": "127.0.0.1"}, False), ({"HOST": "127.3.2.1"}, False), ({"HOST": "::1"}, False),
    ({"HOST": "localhost"}, False),
])
def test_which_settings_may_serve_without_a_token(env: dict[str, str], refused: bool) -> None:
    settings = Settings.from_env(env)
    if refused:
        with pytest.raises(ConfigError, match="AGENT_AUTH_TOKEN.*AGENT_ALLOW_UNAUTHENTICATED=1"):
            settings.require_auth_off_loopback()
    else:
        settings.require_auth_off_loopback()


def test_the_opt_out_must_be_a_yes_or_a_no() -> None:
    with pytest.raises(ConfigError, match="AGENT_ALLOW_UNAUTHENTICATED must be 1 or 0"):
        Settings.from_env({"AGENT_ALLOW_UNAUTHENTICATED": "please"})


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


class _References(HTMLParser):
    """Every URL an HTML page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "action", "data") and value]


async def test_with_api_docs_the_page_and_its_assets_are_same_origin(tmp_path: Path) -> None:
    app = create_app(Settings(host="127.0.0.1", data_dir=tmp_path, api_docs=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1:8000") as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy and "connect-src 'self'" in policy
        parser = _References()
        parser.feed(page.text)
        assert len(parser.urls) >= 3, page.text
        assert "<script>" not in page.text  # no inline script: the policy allows this origin's files only
        for url in parser.urls:
            assert url.startswith("/") and not url.startswith("//"), url  # no scheme, no other host
            asset = await client.get(url)
            assert asset.status_code == 200 and asset.content, url
            assert asset.headers["content-security-policy"] == policy
        start = (await client.get("/docs/start.js")).text
        assert '"/openapi.json"' in start and "validatorUrl: null" in start and "http" not in start
        assert "SwaggerUIBundle" in (await client.get("/docs/swagger-ui-bundle.js")).text
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "Research agent server"
        assert (await client.get("/redoc")).status_code == 404  # no same-origin ReDoc: off
