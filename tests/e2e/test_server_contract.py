"""The HTTP/SSE contract of hosting/server/app.py, end to end.

Real server process → real claude-agent-sdk → real bundled CLI → local model.
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from tests.support.servers import API_KEY, bound_sessions, workspace_dirs, workspace_of
from tests.support.turns import event_order, post_turn

pytestmark = pytest.mark.e2e

TERMINAL = {"result", "error"}


def assert_wire_shape(turn) -> None:
    """session first, done last, ids strictly increasing, every payload v1."""
    assert turn.types[0] == "session"
    assert turn.types[-1] == "done"
    assert turn.types.count("done") == 1
    ids = [event_order(e["id"]) for e in turn.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len({number for number, _ in ids}) == 1 and [seq for _, seq in ids] == list(range(1, len(ids) + 1))
    assert all(e["data"]["v"] == 1 for e in turn.events)


def test_plain_turn_streams_text_then_result_then_done(start_server):
    server = start_server()
    turn = post_turn(server.base_url, "plain-1", "Tell me about otters")
    assert_wire_shape(turn)
    assert turn.types[0:2] == ["session", "text"]
    assert turn.types[-2:] == ["result", "done"]
    assert turn.of("session")[0] == {"v": 1, "session_id": "plain-1", "resumed": False}
    assert "Local model answer to: Tell me about otters" in turn.text
    result = turn.result
    assert result["is_error"] is False and result["stop_reason"] == "end_turn"
    assert result["text"] == turn.text
    assert {"usage", "total_cost_usd", "duration_ms", "num_turns"} <= result.keys()
    assert "raw" not in turn.types


def test_tool_call_turn_orders_tool_use_before_result(start_server):
    server = start_server()
    turn = post_turn(server.base_url, "tools-1", 'Research [[think]] [[tool:WebSearch {"query": "sea otters"}]]')
    assert_wire_shape(turn)
    order = [t for t in turn.types if t in {"thinking", "tool_use", "tool_result", "text", "result"}]
    assert order.index("thinking") < order.index("tool_use") < order.index("tool_result") < order.index("text")
    (tool_use,) = turn.of("tool_use")
    assert tool_use["name"] == "WebSearch" and tool_use["input"] == {"query": "sea otters"}
    (tool_result,) = turn.of("tool_result")
    assert tool_result["tool_use_id"] == tool_use["id"] and tool_result["is_error"] is False
    assert "https://example.org/sea-otters/1" in tool_result["content"]
    assert turn.result["num_turns"] == 2


def test_raw_sdk_messages_only_on_opt_in(start_server):
    server = start_server()
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{server.base_url}/sessions/raw-1/messages", json={"prompt": "hi", "include_raw": True})
    raw = [line for line in response.text.splitlines() if line == "event: raw"]
    assert raw, response.text
    assert API_KEY not in response.text


def test_model_error_mid_conversation_ends_with_error_then_done(start_server, local_model):
    server = start_server()
    first = post_turn(server.base_url, "err-1", "Remember this value: kiwi")
    assert first.result["is_error"] is False
    failed = post_turn(server.base_url, "err-1", "Now fail [[error:529]]")
    assert_wire_shape(failed)
    assert failed.types[-3:] == ["result", "error", "done"]
    (error,) = failed.of("error")
    assert error["code"] == "overloaded" and error["retryable"] is True
    assert failed.result["is_error"] is True
    # The session survives the error and still remembers.
    after = post_turn(server.base_url, "err-1", "What value did I ask you to remember?")
    assert "You asked me to remember kiwi." in after.text


@pytest.mark.parametrize("status, code", [(429, "rate_limited"), (500, "model_unavailable")])
def test_other_api_errors_are_retryable_errors(start_server, status, code):
    server = start_server()
    turn = post_turn(server.base_url, f"err-{status}", f"x [[error:{status}]]")
    assert turn.types[-2:] == ["error", "done"]
    assert turn.of("error")[0]["code"] == code


def test_recall_across_two_turns(start_server):
    server = start_server()
    post_turn(server.base_url, "recall-1", "Remember this value: 4417")
    second = post_turn(server.base_url, "recall-1", "What value did I ask you to remember?")
    assert second.of("session")[0]["resumed"] is True
    assert "You asked me to remember 4417." in second.text
    other = post_turn(server.base_url, "recall-2", "What value did I ask you to remember?")
    assert "You have not asked me to remember any value." in other.text


def test_recall_after_sigkill_of_the_server(start_server, tmp_path):
    data_dir = tmp_path / "data"
    first = start_server(data_dir=data_dir)
    post_turn(first.base_url, "survivor", "Remember this value: 90210")
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    second = start_server(data_dir=data_dir)
    turn = post_turn(second.base_url, "survivor", "What value did I ask you to remember?")
    assert turn.of("session")[0]["resumed"] is True
    assert "You asked me to remember 90210." in turn.text


def test_heartbeat_comments_keep_an_idle_stream_alive(start_server):
    server = start_server(AGENT_HEARTBEAT_SECONDS="0.2")
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{server.base_url}/sessions/beat/messages", json={"prompt": "wait [[delay:1.2]]"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert any(line.startswith(":") for line in response.text.splitlines())


def test_session_resource_get_and_delete(start_server):
    server = start_server()
    base = server.base_url
    assert httpx.get(f"{base}/sessions/nobody").status_code == 404
    post_turn(base, "res-1", "Remember this value: 12")
    workspace = workspace_of(server.data_dir, "res-1")
    described = httpx.get(f"{base}/sessions/res-1").json()
    assert described["session_id"] == "res-1" and described["has_history"] is True and described["busy"] is False
    assert httpx.delete(f"{base}/sessions/res-1").status_code == 204
    assert httpx.get(f"{base}/sessions/res-1").status_code == 404
    assert not workspace.exists() and "res-1" not in bound_sessions(server.data_dir)
    assert httpx.delete(f"{base}/sessions/res-1").status_code == 404
    again = post_turn(base, "res-1", "What value did I ask you to remember?")
    assert "You have not asked me to remember any value." in again.text


def test_health_and_ready(start_server):
    server = start_server()
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


# -- bad input: clear JSON errors, nothing reaches the model, nothing on disk --
# Every case in process: tests/unit/test_server_refusals.py. Here one per behaviour, for real.

BIG = "x" * (256 * 1024 + 1)


def _chunked(data: bytes):
    for start in range(0, len(data), 16 * 1024):
        yield data[start:start + 16 * 1024]


BAD_REQUESTS = [
    pytest.param("bad.id", {"json": {"prompt": "hi"}}, 400, id="dot-in-id"),
    pytest.param("ok", {"content": _chunked(json.dumps({"prompt": BIG}).encode()),
                        "headers": {"content-type": "application/json"}}, 413, id="too-large-chunked"),
]


@pytest.mark.parametrize("session_id, kwargs, status", BAD_REQUESTS)
def test_bad_input_is_refused_and_leaves_nothing(start_server, local_model, session_id, kwargs, status):
    server = start_server()
    before = local_model.requests_total()
    response = httpx.post(f"{server.base_url}/sessions/{session_id}/messages", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]
    assert local_model.requests_total() == before
    assert not bound_sessions(server.data_dir)
    assert not workspace_dirs(server.data_dir)


def test_a_body_just_under_the_limit_is_accepted(start_server):
    server = start_server()
    prompt = "y" * (256 * 1024 - 64)
    turn = post_turn(server.base_url, "big-ok", prompt)
    assert turn.types[-1] == "done" and "error" not in turn.types


# -- auth -----------------------------------------------------------------------


def test_bearer_token_required_except_health(start_server, local_model):
    """Every header and route in process (tests/unit/test_server_refusals.py); here one wrong token."""
    server = start_server(AGENT_AUTH_TOKEN="tok-9c1d")
    base = server.base_url
    before = local_model.requests_total()
    assert httpx.get(f"{base}/health").status_code == 200
    response = httpx.post(f"{base}/sessions/auth-1/messages", json={"prompt": "hi"},
                          headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]
    assert local_model.requests_total() == before
    assert not bound_sessions(server.data_dir)
    turn = post_turn(base, "auth-1", "hi", headers={"Authorization": "Bearer tok-9c1d"})
    assert turn.types[-2:] == ["result", "done"]


def test_missing_credentials_is_one_clear_startup_error(local_model, tmp_path):
    import subprocess
    import sys

    from tests.support import ROOT
    from tests.support.servers import agent_env

    env = agent_env(local_model, tmp_path / "data")
    del env["ANTHROPIC_API_KEY"]
    proc = subprocess.run([sys.executable, "-m", "hosting.server"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "ANTHROPIC_API_KEY" in proc.stderr and "Traceback" not in proc.stderr
