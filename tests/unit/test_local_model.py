"""Unit tests of the local model's script (pure logic) and one real HTTP exchange."""

from __future__ import annotations

import httpx

from hosting.local_model import MODEL_NAME, plan_reply


def user(*texts: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": t} for t in texts]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_recall_needs_the_earlier_turn_in_the_request():
    remembered = plan_reply({"messages": [user("Remember this value: 42"), assistant("ok"),
                                          user("What value did I ask you to remember?")]})
    assert remembered.blocks[0]["text"] == "You asked me to remember 42."
    forgotten = plan_reply({"messages": [user("What value did I ask you to remember?")]})
    assert forgotten.blocks[0]["text"] == "You have not asked me to remember any value."


def test_system_reminders_and_failed_turns_do_not_confuse_the_prompt():
    reply = plan_reply({"messages": [user("<system-reminder>Remember this value: 9</system-reminder>",
                                          "boom [[error:529]]", "hello")]})
    assert reply.error_status is None
    assert reply.blocks[0]["text"].startswith("Local model answer to: hello")


def test_directives():
    reply = plan_reply({"messages": [user('go [[think]] [[delay:0.5]] [[slow:0.1]] [[tool:WebSearch {"query": "q"}]]')]})
    assert [b["type"] for b in reply.blocks] == ["thinking", "tool_use"]
    assert reply.blocks[1]["input"] == {"query": "q"} and reply.stop_reason == "tool_use"
    assert (reply.delay, reply.chunk_pause) == (0.5, 0.1)
    assert plan_reply({"messages": [user("x [[error:429]]")]}).error_status == 429


def test_tool_results_get_a_final_answer_not_another_tool_call():
    request = {"messages": [
        user('go [[tool:Bash {"command": "env"}]]'),
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": "No such tool"}]},
    ]}
    reply = plan_reply(request)
    assert reply.stop_reason == "end_turn"
    assert reply.blocks == [{"type": "text", "text": "Tool Bash failed: No such tool"}]


def test_http_streaming_and_plain_replies(local_model):
    body = {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": [user("hi")]}
    plain = httpx.post(f"{local_model.base_url}/v1/messages", json=body).json()
    assert plain["model"] == MODEL_NAME and plain["content"][0]["text"].startswith("Local model answer to: hi")
    with httpx.stream("POST", f"{local_model.base_url}/v1/messages", json={**body, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("event: ")]
    assert lines[0] == "event: message_start" and lines[-1] == "event: message_stop"
    error = httpx.post(f"{local_model.base_url}/v1/messages", json={**body, "messages": [user("x [[error:529]]")]})
    assert error.status_code == 529 and error.json()["error"]["type"] == "overloaded_error"
    counted = local_model.token_counts()
    assert httpx.post(f"{local_model.base_url}/v1/messages/count_tokens", json=body).json()["input_tokens"] > 0
    assert local_model.token_counts() == counted + 1
