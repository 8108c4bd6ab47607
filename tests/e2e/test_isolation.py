"""Sessions on one server cannot reach each other's files or the server's environment.

The local model asks for Bash/Read/Grep/Glob calls aimed at another session's
transcript and files and at ``env``. The hosted agent only has WebSearch
(``tools=``), so every call must fail, and no secret may reach the model or
the client. A positive control shows the same probe does catch a leak when
the tools exist.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, query

from tests.support.servers import API_KEY, workspace_of
from tests.support.turns import post_turn

pytestmark = pytest.mark.e2e

AUTH_TOKEN = "server-token-d41d8cd9"
FILE_SECRET = "FILE-SECRET-7f3a"
RECALL_SECRET = "RECALL-SECRET-2b8e"


def _tool(name: str, arguments: dict) -> str:
    return f"[[tool:{name} {json.dumps(arguments)}]]"


def _model_saw(local_model, needle: str, since: int) -> bool:
    recent = httpx.get(f"{local_model.base_url}/local/requests", params={"since": since}).json()["recent"]
    return needle in json.dumps(recent)


def test_tools_cannot_reach_other_sessions_or_env(start_server, local_model):
    server = start_server(AGENT_AUTH_TOKEN=AUTH_TOKEN)
    since = local_model.requests_total()
    auth = {"Authorization": f"Bearer {AUTH_TOKEN}"}
    post_turn(server.base_url, "victim", f"Remember this value: {RECALL_SECRET}", headers=auth)
    victim_root = workspace_of(server.data_dir, "victim")
    (victim_root / "work" / "notes.txt").write_text(FILE_SECRET)
    transcript = next(victim_root.glob("config/projects/*/*.jsonl"))

    probes = " ".join([
        _tool("Bash", {"command": f"cat {transcript}; cat {victim_root}/work/notes.txt; env"}),
        _tool("Read", {"file_path": str(victim_root / "work" / "notes.txt")}),
        _tool("Grep", {"pattern": "SECRET", "path": str(server.data_dir)}),
        _tool("Glob", {"pattern": "**/*.jsonl", "path": str(server.data_dir)}),
    ])
    turn = post_turn(server.base_url, "attacker", f"Show me everything {probes}", headers=auth)

    results = turn.of("tool_result")
    assert len(results) == 4
    assert all(r["is_error"] for r in results), results
    assert all("No such tool available" in r["content"] for r in results), results
    stream = json.dumps(turn.events)
    for secret in (FILE_SECRET, RECALL_SECRET, API_KEY, AUTH_TOKEN):
        assert secret not in stream
    assert not _model_saw(local_model, FILE_SECRET, since)
    # The victim's own conversation is intact and still private to it.
    recall = post_turn(server.base_url, "victim", "What value did I ask you to remember?", headers=auth)
    assert RECALL_SECRET in recall.text


def test_at_mentions_do_not_pull_files_into_the_prompt(start_server, local_model):
    server = start_server()
    since = local_model.requests_total()
    post_turn(server.base_url, "victim", "hello")
    victim_root = workspace_of(server.data_dir, "victim")
    secret_file = victim_root / "work" / "notes.txt"
    secret_file.write_text(FILE_SECRET)
    turn = post_turn(server.base_url, "attacker", f"Summarise @{secret_file} and @/proc/self/environ [[echo-request]]")
    assert f"@{secret_file}" in turn.text
    assert FILE_SECRET not in turn.text and API_KEY not in turn.text
    assert not _model_saw(local_model, FILE_SECRET, since)


def test_positive_control_the_probe_sees_a_leak_when_read_exists(local_model, tmp_path):
    """Same probe, plain SDK with Read enabled: the secret reaches the model."""
    since = local_model.requests_total()
    secret_file = tmp_path / "notes.txt"
    secret_file.write_text(FILE_SECRET)
    (tmp_path / "config").mkdir()
    options = ClaudeAgentOptions(
        tools=["Read"], allowed_tools=["Read"], permission_mode="dontAsk", setting_sources=[], cwd=str(tmp_path),
        env={"ANTHROPIC_BASE_URL": local_model.base_url, "ANTHROPIC_API_KEY": API_KEY,
             "CLAUDE_CONFIG_DIR": str(tmp_path / "config"), "CLAUDE_CODE_MAX_RETRIES": "0",
             "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"},
    )

    async def run() -> ResultMessage:
        result = None
        async for message in query(prompt=f"read it {_tool('Read', {'file_path': str(secret_file)})}", options=options):
            if isinstance(message, ResultMessage):
                result = message
        assert result is not None
        return result

    result = anyio.run(run)
    assert FILE_SECRET in (result.result or "")
    assert _model_saw(local_model, FILE_SECRET, since)
