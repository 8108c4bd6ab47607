"""Unit tests of pure logic: settings, wire translation, redaction, workspaces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from claude_agent_sdk import AssistantMessage, ResultMessage, StreamEvent, TextBlock, ToolUseBlock

from hosting.contract import InvalidSessionId, validate_session_id
from hosting.server.box import Box
from hosting.server.settings import Settings
from hosting.server.wire import Redactor, TurnTranslator, classify_api_error
from hosting.server.workspaces import WorkspaceStore
from hosting.settings_env import ConfigError


def test_settings_defaults_and_overrides():
    roomy = Box(machine_memory=24 * 2**30, cpus=4)
    default = Settings.from_env({}, box=roomy)
    assert (default.port, default.data_dir, default.model, default.warm_sessions, default.prewarm) == (
        8000, Path("/data"), "claude-sonnet-4-6", 32, 12)
    assert default.max_starting_clis == 4 and default.queue_timeout_seconds == 10 and default.session_capacity is None
    assert Settings.from_env({"AGENT_SESSION_CAPACITY": "3"}).session_capacity == 3
    assert Settings.from_env({}).box.cpus == len(os.sched_getaffinity(0))
    custom = Settings.from_env({"PORT": "9000", "AGENT_WARM_SESSIONS": "0", "AGENT_SESSION_TTL_SECONDS": "0",
                                "AGENT_SESSION_STORE": "redis://127.0.0.1:6379/0", "AGENT_MAX_STARTING_CLIS": "1"})
    assert (custom.port, custom.warm_sessions, custom.session_ttl_seconds, custom.max_starting_clis) == (9000, 0, None, 1)


def test_cli_runtime_tuning_is_on_by_default_and_the_operator_can_override_it():
    assert {"BUN_JSC_useDFGJIT": "0", "BUN_GC_TIMER_DISABLE": "1"}.items() <= Settings.from_env({}).cli_env().items()
    env = Settings.from_env({"BUN_JSC_useDFGJIT": "1"}).cli_env()
    assert env["BUN_JSC_useDFGJIT"] == "1" and env["BUN_GC_TIMER_DISABLE"] == "1"


@pytest.mark.parametrize("env, name", [
    ({"PORT": "http"}, "PORT"), ({"PORT": "0"}, "PORT"), ({"AGENT_PREWARM": "-1"}, "AGENT_PREWARM"),
    ({"AGENT_MAX_STARTING_CLIS": "0"}, "AGENT_MAX_STARTING_CLIS"),
    ({"AGENT_SESSION_CAPACITY": "0"}, "AGENT_SESSION_CAPACITY"), ({"AGENT_SESSION_CAPACITY": "one"}, "AGENT_SESSION_CAPACITY"),
    ({"AGENT_QUEUE_TIMEOUT_SECONDS": "-1"}, "AGENT_QUEUE_TIMEOUT_SECONDS"),
    ({"AGENT_IDLE_TIMEOUT_SECONDS": "soon"}, "AGENT_IDLE_TIMEOUT_SECONDS"),
    ({"AGENT_SESSION_STORE": "mysql://x"}, "AGENT_SESSION_STORE"),
])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)


def test_credentials_required_and_secrets_kept_from_the_cli():
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        Settings.from_env({}).require_credentials()
    settings = Settings.from_env({"ANTHROPIC_API_KEY": "sk-key-1", "AGENT_AUTH_TOKEN": "tok-2"})
    settings.require_credentials()
    env = settings.cli_env()
    assert env["ANTHROPIC_API_KEY"] == "sk-key-1" and env["AGENT_AUTH_TOKEN"] == ""
    assert "sk-key-1" not in repr(settings) and "tok-2" not in repr(settings)


@pytest.mark.parametrize("session_id", ["a", "A-1_b", "x" * 64])
def test_valid_session_ids(session_id):
    assert validate_session_id(session_id) == session_id


@pytest.mark.parametrize("session_id", ["", "-a", "_a", "a.b", "a/b", "a b", "x" * 65, "a\n", "é"])
def test_invalid_session_ids(session_id):
    with pytest.raises(InvalidSessionId):
        validate_session_id(session_id)


def test_binding_is_first_writer_wins(tmp_path):
    store = WorkspaceStore(tmp_path)
    store.ensure_writable()
    first = store.bind("s", store.new_workspace())
    loser = store.new_workspace()
    second = store.bind("s", loser)
    assert second.workspace == first.workspace
    assert not loser.root.exists()


def _stream(message_id: str, text: str) -> list[StreamEvent]:
    return [
        StreamEvent(uuid="u", session_id="s", event={"type": "message_start", "message": {"id": message_id}}),
        StreamEvent(uuid="u", session_id="s",
                    event={"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}}),
    ]


def _result(**overrides) -> ResultMessage:
    fields = dict(subtype="success", duration_ms=1, duration_api_ms=1, is_error=False, num_turns=1,
                  session_id="s", result="done")
    fields.update(overrides)
    return ResultMessage(**fields)


def test_streamed_text_is_not_repeated_by_the_complete_message():
    translator = TurnTranslator(Redactor([]))
    events = [e for m in _stream("m1", "Hi") for e in translator.translate(m)]
    events += translator.translate(AssistantMessage(content=[TextBlock("Hi"), ToolUseBlock("t1", "WebSearch", {"query": "q"})],
                                                    model="x", message_id="m1"))
    assert [(e.type, e.data.get("text", e.data.get("name"))) for e in events] == [("text", "Hi"), ("tool_use", "WebSearch")]


def test_unstreamed_text_is_sent_and_api_errors_become_error_events():
    translator = TurnTranslator(Redactor([]))
    late = AssistantMessage(content=[TextBlock("late")], model="x", message_id="m9")
    assert translator.translate(late)[0].data == {"text": "late"}
    events = translator.translate(_result(is_error=True, result="API Error: 529", api_error_status=529))
    assert [e.type for e in events] == ["result", "error"]
    assert events[1].data == {"code": "overloaded", "message": "API Error: 529", "retryable": True}


def test_interrupted_results_say_so():
    events = TurnTranslator(Redactor([])).translate(_result(subtype="error_during_execution", is_error=True, result=None,
                                                           terminal_reason="aborted_streaming"))
    assert events[1].data["code"] == "interrupted"


@pytest.mark.parametrize("status, code, retryable", [
    (429, "rate_limited", True), (529, "overloaded", True), (503, "model_unavailable", True),
    (401, "model_auth_failed", False), (None, "agent_error", False),
])
def test_classify_api_error(status, code, retryable):
    assert classify_api_error(status) == (code, retryable)


def test_redaction_reaches_nested_values():
    redact = Redactor(["sk-secret", None])
    assert redact({"a": ["x sk-secret y", {"b": "sk-secret"}], "n": 1}) == {"a": ["x [redacted] y", {"b": "[redacted]"}], "n": 1}
