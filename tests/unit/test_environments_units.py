"""Unit tests of the environments orchestrator's pure logic: settings, the work secret,
which item is newer, which errors are fatal, the runner's status record (the archive ledger,
on a real Redis too: tests/integration/test_environments_archive.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx2
import pytest
from anthropic import APIStatusError
from anthropic.types.beta.environments import BetaSelfHostedWork

from hosting.environments.credentials import sessions_token
from hosting.environments.lifecycle import is_fatal, is_newer
from hosting.environments.runner import status, workspace
from hosting.environments.sandboxes import RunnerLaunch, RunnerStatus, sandbox_name
from hosting.environments.settings import EnvironmentSettings
from hosting.sandboxes.base import SANDBOX_ID_PATTERN, VOLUME_PATTERN, SandboxError
from hosting.settings_env import ConfigError

BASE = {"ANTHROPIC_ENVIRONMENT_ID": "env_01", "ANTHROPIC_ENVIRONMENT_KEY": "key-1"}


def secret(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def test_settings_read_the_key_from_a_file_and_never_print_it(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("file-key-123\n")
    settings = EnvironmentSettings.from_env({"ANTHROPIC_ENVIRONMENT_ID": "env_01",
                                             "ANTHROPIC_ENVIRONMENT_KEY_FILE": str(key)})
    assert settings.environment_key == "file-key-123"
    assert "file-key-123" not in repr(settings)
    assert settings.mode == "poll" and settings.block_ms < 1000


def test_the_orchestrator_reads_the_same_backend_settings_as_the_gateway_under_its_own_prefix() -> None:
    settings = EnvironmentSettings.from_env({**BASE, "ENVIRONMENT_BACKEND": "kubernetes",
                                             "ENVIRONMENT_KUBERNETES_NAMESPACE": "envs",
                                             "GATEWAY_KUBERNETES_NAMESPACE": "not-this-one"})
    assert (settings.sandboxes.backend, settings.sandboxes.kubernetes_namespace) == ("kubernetes", "envs")
    assert settings.sandboxes.installation == "environments" and settings.archive_seconds == 7 * 24 * 3600
    modal = EnvironmentSettings.from_env({**BASE, "ENVIRONMENT_BACKEND": "modal", "ENVIRONMENT_MODAL_SECRETS": "a,b"})
    assert (modal.sandboxes.modal_app, modal.sandboxes.modal_secrets) == ("research-agent-environments", ("a", "b"))


@pytest.mark.parametrize(("env", "message"), [
    ({"ANTHROPIC_ENVIRONMENT_KEY": "k"}, "ANTHROPIC_ENVIRONMENT_ID is required"),
    ({"ANTHROPIC_ENVIRONMENT_ID": "env_01"}, "the environment key is required"),
    ({**BASE, "ANTHROPIC_ENVIRONMENT_KEY_FILE": "/x"}, "not both"),
    ({**BASE, "ENVIRONMENT_POLL_BLOCK_MS": "1000"}, "at most 999"),
    ({**BASE, "ENVIRONMENT_BACKEND": "podman"}, "ENVIRONMENT_BACKEND must be one of"),
    ({**BASE, "ENVIRONMENT_MODE": "webhook"}, "webhook mode needs the signing secret"),
    ({**BASE, "ENVIRONMENT_REDIS_URL": "http://x"}, "ENVIRONMENT_REDIS_URL"),
    ({**BASE, "ANTHROPIC_BASE_URL": "ftp://x"}, "ANTHROPIC_BASE_URL"),
    ({**BASE, "ENVIRONMENT_IDLE_SECONDS": "-1"}, "ENVIRONMENT_IDLE_SECONDS"),
    ({**BASE, "ENVIRONMENT_ARCHIVE_SECONDS": "soon"}, "ENVIRONMENT_ARCHIVE_SECONDS"),
    ({**BASE, "ENVIRONMENT_KUBERNETES_NAMESPACE": "Not_A_Label"}, "ENVIRONMENT_KUBERNETES_NAMESPACE"),
    ({**BASE, "ENVIRONMENT_INSTALLATION": "x" * 21}, "ENVIRONMENT_INSTALLATION"),
    ({**BASE, "ANTHROPIC_ENVIRONMENT_KEY_FILE": "/nonexistent/key", "ANTHROPIC_ENVIRONMENT_KEY": ""}, "cannot read"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EnvironmentSettings.from_env(env)


def test_the_sessions_token_comes_out_of_the_secret_and_nothing_else_does() -> None:
    assert sessions_token(secret({"sessions_token": "sst_1", "ingress_token": "x"})) == "sst_1"
    assert sessions_token(secret({"ingress_token": "x"})) is None
    assert sessions_token(secret(["sessions_token"])) is None
    assert sessions_token(secret({"sessions_token": ""})) is None
    assert sessions_token("%%% not base64 %%%") is None
    assert sessions_token(None) is None and sessions_token("") is None


def item(created_at: str) -> BetaSelfHostedWork:
    return BetaSelfHostedWork.model_construct(id="work_1", created_at=created_at)


def test_only_a_newer_item_supersedes_the_running_one() -> None:
    running = RunnerStatus("running", "work_0", "2026-01-01T00:00:01Z")
    assert is_newer(item("2026-01-01T00:00:02Z"), running)
    assert not is_newer(item("2026-01-01T00:00:00.5Z"), running)
    assert is_newer(item("2026-01-01T00:00:00Z"), RunnerStatus("running", "work_0", None))


def status_error(code: int) -> APIStatusError:
    response = httpx2.Response(code, request=httpx2.Request("GET", "http://127.0.0.1/"))
    return APIStatusError("x", response=response, body=None)


@pytest.mark.parametrize(("code", "fatal"), [(400, True), (401, True), (404, True), (409, True), (408, False),
                                             (429, False), (500, False), (503, False)])
def test_4xx_but_408_and_429_is_fatal_for_the_item(code: int, fatal: bool) -> None:
    assert is_fatal(status_error(code)) is fatal


def test_sandbox_names_are_valid_for_every_backend_and_distinct() -> None:
    one, two = sandbox_name("env_A", "sesn_X"), sandbox_name("env_A", "sesn_Y")
    assert one != two and one != sandbox_name("env_B", "sesn_X")
    assert SANDBOX_ID_PATTERN.fullmatch(one) and VOLUME_PATTERN.fullmatch(one)


def test_the_runner_gets_the_items_secret_and_never_a_key() -> None:
    launch = RunnerLaunch("work_1", "2026-01-01T00:00:00Z", "sesn_1", "c2VjcmV0", "env_1", "http://127.0.0.1:1", 2.0)
    env = launch.env()
    assert env["ANTHROPIC_WORK_SECRET"] == "c2VjcmV0"
    assert not any("KEY" in name for name in env)
    assert "c2VjcmV0" not in repr(launch)


def test_runner_status_is_parsed_strictly() -> None:
    assert RunnerStatus.parse('{"state": "dead", "work_id": "w", "pid": 3}') == RunnerStatus("dead", "w", pid=3)
    with pytest.raises(SandboxError):
        RunnerStatus.parse("Traceback ...")
    with pytest.raises(SandboxError):
        RunnerStatus.parse('{"state": "zombie"}')


def test_a_runner_record_without_its_lock_holder_reads_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_DATA_DIR", str(tmp_path))
    assert status() == {"state": "none"}
    (tmp_path / "environment").mkdir()
    (tmp_path / "environment" / "runner.json").write_text(json.dumps({"pid": 1, "work_id": "w", "exit_code": None}))
    (tmp_path / "environment" / "runner.lock").touch()
    assert status()["state"] == "dead"
    (tmp_path / "environment" / "runner.json").write_text(json.dumps({"pid": 1, "work_id": "w", "exit_code": 0}))
    assert status()["state"] == "exited"
    with pytest.raises(ValueError):
        workspace("../escape")
