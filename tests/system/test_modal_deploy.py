"""The Modal tier's scripts end to end, against the stand-in of Modal's control plane.

``hosting/modal/modal_app.py`` and ``teardown.py`` run as subprocesses with the real
``modal`` client pointed at the stand-in (``MODAL_SERVER_URL``, workspace token, own
config file). The ``anthropic`` secret is made with ``modal secret create``, as the
README says, and points the sandbox at the local model. Turns go through the sandbox's
tunnel (HTTPS on 127.0.0.1, the stand-in's CA) to the real server, SDK and CLI.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.standins.modal import ModalStandIn
from tests.support import ROOT
from tests.support.modal_standin import subprocess_env
from tests.support.servers import API_KEY, LocalModel
from tests.support.turns import post_turn

pytestmark = [pytest.mark.modal, pytest.mark.docker, pytest.mark.e2e]

RECALL = "What value did I ask you to remember?"


class Scripts:
    """The tier's scripts and the ``modal`` CLI, run as an operator would (from the repository)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def deploy(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("hosting/modal/modal_app.py", *args)

    def teardown(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("hosting/modal/teardown.py", *args)


@pytest.fixture
def scripts(modal_env: dict[str, str], modal_standin: ModalStandIn, local_model: LocalModel,
            tmp_path: Path) -> Iterator[Scripts]:
    """The scripts' environment, with the ``anthropic`` secret made; every sandbox of the
    apps the tests deploy is terminated at the end, whatever happened."""
    made = Scripts({**subprocess_env(modal_env, tmp_path), "PYTHONPATH": str(ROOT)})
    # AGENT_PREWARM: the server's default pool of CLIs is sized for serving, not for a test.
    created = made.run("-m", "modal", "secret", "create", "--force", "anthropic",
                       f"ANTHROPIC_BASE_URL={local_model.base_url}", f"ANTHROPIC_API_KEY={API_KEY}", "AGENT_PREWARM=1")
    assert created.returncode == 0, created.stderr
    try:
        yield made
    finally:
        for app in ("research-agent", "research-agent-nosecret", "research-agent-slow"):
            modal_standin.terminate_app(app)


def printed(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The ``key: value`` lines the deploy script prints (the cookbook's format)."""
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert {"sandbox", "url", "token", "try"} <= set(lines), proc.stdout
    return lines


def test_deploy_recall_redeploy_and_teardown(scripts: Scripts, modal_standin: ModalStandIn) -> None:
    """Deploy prints sandbox/url/token once the server is ready; the token is required (401
    without it or with another); two turns recall through the tunnel; a second run finds the
    same sandbox and token; ``--replace`` starts a fresh sandbox with a new token on the same
    volume (the conversation survives); teardown removes sandbox, volume and tokens, and a
    second teardown has nothing to remove."""
    first = printed(scripts.deploy())
    url, token = first["url"], first["token"]
    assert url.startswith("https://127.0.0.1:") and len(token) >= 40
    assert f"{url}/sessions/demo/messages" in first["try"] and token in first["try"]
    assert modal_standin.running_sandboxes("research-agent") == [first["sandbox"]]

    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    for headers in ({}, {"authorization": "Bearer not-the-token"}):
        refused = httpx.post(f"{url}/sessions/s1/messages", json={"prompt": "hi"}, headers=headers, timeout=10)
        assert refused.status_code == 401
    bearer = {"authorization": f"Bearer {token}"}
    remembered = post_turn(url, "s1", "Remember this value: 42", headers=bearer)
    assert remembered.types[-1] == "done" and not remembered.result["is_error"]
    assert "You asked me to remember 42." in post_turn(url, "s1", RECALL, headers=bearer).text

    again = printed(scripts.deploy())
    assert (again["sandbox"], again["url"], again["token"]) == (first["sandbox"], url, token)
    assert modal_standin.running_sandboxes("research-agent") == [first["sandbox"]]

    fresh = printed(scripts.deploy("--replace"))
    assert fresh["sandbox"] != first["sandbox"] and fresh["token"] != token
    assert modal_standin.running_sandboxes("research-agent") == [fresh["sandbox"]]
    new_bearer = {"authorization": f"Bearer {fresh['token']}"}
    assert "You asked me to remember 42." in post_turn(fresh["url"], "s1", RECALL, headers=new_bearer).text

    removed = scripts.teardown()
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [f"terminated sandbox {fresh['sandbox']}",
                                           "deleted volume research-agent-data", "deleted token dict research-agent-tokens"]
    assert modal_standin.running_sandboxes("research-agent") == []
    assert "research-agent-data" not in modal_standin.volume_names()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{fresh['url']}/health", timeout=5)
    twice = scripts.teardown()
    assert (twice.returncode, twice.stdout.strip()) == (0, "nothing to remove")


def test_a_missing_secret_or_a_sandbox_never_ready_fails_clearly_and_leaves_nothing_running(
        scripts: Scripts, modal_standin: ModalStandIn) -> None:
    """No secret of that name: one line saying how to make it, exit 1, no sandbox started.
    Not ready in time: one line, exit 1, and the sandbox is terminated."""
    missing = scripts.deploy("--app", "research-agent-nosecret", "--secret", "no-such-secret")
    assert missing.returncode == 1
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith("modal_app: Modal secret 'no-such-secret' not found: create it with "
                           "`modal secret create no-such-secret ANTHROPIC_API_KEY=...`")
    assert missing.stdout == ""
    assert modal_standin.running_sandboxes("research-agent-nosecret") == []

    slow = scripts.deploy("--app", "research-agent-slow", "--ready-timeout", "0")
    assert slow.returncode == 1 and slow.stdout == ""
    (line,) = slow.stderr.strip().splitlines()
    assert line.startswith("modal_app: sandbox ") and line.endswith("was not ready within 0 s; terminated it")
    assert modal_standin.running_sandboxes("research-agent-slow") == []
    assert scripts.teardown("--app", "research-agent-slow", "--volume", "research-agent-data").returncode == 0


def test_without_modal_credentials_it_says_how_to_get_them(scripts: Scripts, tmp_path: Path) -> None:
    """No token at all, or one the workspace does not know: exit 1 with one line, nothing made."""
    without = {k: v for k, v in scripts.env.items() if k not in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")}
    wrong = {**scripts.env, "MODAL_TOKEN_SECRET": "as-not-the-secret"}
    for env in (without, wrong):
        proc = Scripts({**env, "MODAL_CONFIG_PATH": str(tmp_path / "empty.toml")}).deploy()
        assert proc.returncode == 1 and proc.stdout == ""
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("modal_app: no usable Modal credentials (") and "run `modal setup`" in line
