"""Dari's custom runtime (``POST /runtime/advance``) on the server and through the gateway.

Real server and gateway processes, the real SDK and CLI, the local model (whose recall
rule proves that the second advance saw the first through the returned state).
"""

from __future__ import annotations

import concurrent.futures
import shutil
from typing import Any

import httpx
import pytest

from tests.support.gateways import ALICE, BOB, Gateways, auth
from tests.support.servers import bound_sessions

pytestmark = pytest.mark.e2e

REMEMBER = "Remember this value: heron-42"
RECALL = "What value did I ask you to remember?"


def advance_body(*texts: str, state: Any = ..., blocks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A request shaped like Dari's example; ``state=...`` leaves ``state_ref`` out."""
    content = blocks if blocks is not None else [{"type": "text", "text": text} for text in texts]
    body: dict[str, Any] = {"input": {"type": "user_message", "message": {"content": content}}}
    if state is not ...:
        body["state_ref"] = {"json": state}
    return body


def advance(base_url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{base_url}/runtime/advance", json=body, headers=headers or {}, timeout=120)


def test_two_advances_remember_through_the_returned_state(start_server) -> None:
    server = start_server()
    first = advance(server.base_url, advance_body(REMEMBER))
    assert first.status_code == 200, first.text
    assert first.json()["text"] == "Noted: I will remember heron-42."
    state = first.json()["state"]
    assert state["turns"] == 1 and state["session_id"].startswith("dari-")

    second = advance(server.base_url, advance_body("Question:", RECALL, state=state))
    assert second.status_code == 200, second.text
    assert second.json() == {"text": "You asked me to remember heron-42.",
                             "state": {"session_id": state["session_id"], "turns": 2}}
    # An ordinary session of the server: the message routes see it too.
    described = httpx.get(f"{server.base_url}/sessions/{state['session_id']}").json()
    assert described["has_history"] is True


def test_missing_null_and_malformed_states_and_other_blocks(start_server, local_model) -> None:
    server = start_server()
    for body in (advance_body("Hello"), advance_body("Hello", state=None),
                 {**advance_body("Hello"), "state_ref": None}):
        answer = advance(server.base_url, body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"]["turns"] == 1
    sessions = bound_sessions(server.data_dir)
    assert len(sessions) == 3  # each a new conversation
    requests = local_model.requests_total()

    refused = [
        (advance_body("x", state={"session_id": "no spaces allowed", "turns": 1}), 422, "session_id"),
        (advance_body("x", state={"session_id": "s-1", "turns": -1}), 422, "turns"),
        (advance_body("x", state={"session_id": "s-1", "turns": "1"}), 422, "turns"),
        (advance_body("x", state={"session_id": "s-1", "turns": 1, "extra": True}), 422, "extra"),
        (advance_body("x", state="s-1"), 422, "state_ref"),
        (advance_body(blocks=[{"type": "text", "text": "look"}, {"type": "image", "source": {}}]), 422, "'image'"),
        (advance_body(blocks=[{"type": "file", "file_id": "f"}]), 422, "'file'"),
        (advance_body(blocks=[]), 422, "content"),
        (advance_body("   "), 422, "no text"),
        ({"input": {"type": "tool_result", "message": {"content": []}}}, 422, "user_message"),
        ([1, 2], 400, "JSON object"),
    ]
    for body, status, mentioned in refused:
        answer = advance(server.base_url, body)
        assert answer.status_code == status, (body, answer.text)
        assert mentioned in answer.text
    not_json = httpx.post(f"{server.base_url}/runtime/advance", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    wrong_type = httpx.post(f"{server.base_url}/runtime/advance", content=b"{}", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    # Nothing was created and the model was never asked.
    assert bound_sessions(server.data_dir) == sessions
    assert local_model.requests_total() == requests


def test_a_state_whose_history_is_gone_is_refused_not_restarted(start_server, tmp_path) -> None:
    server = start_server()
    state = advance(server.base_url, advance_body(REMEMBER)).json()["state"]
    server.stop()
    shutil.rmtree(server.data_dir)
    fresh = start_server(data_dir=tmp_path / "fresh")
    answer = advance(fresh.base_url, advance_body(RECALL, state=state))
    assert answer.status_code == 410
    assert "cannot be resumed" in answer.json()["detail"]
    assert bound_sessions(fresh.data_dir) == set()


@pytest.mark.stores
def test_a_state_resumes_from_the_session_store_after_the_data_dir_is_wiped(start_server, tmp_path, redis_url) -> None:
    store = {"AGENT_SESSION_STORE": redis_url}
    server = start_server(**store)
    state = advance(server.base_url, advance_body(REMEMBER)).json()["state"]
    server.stop()
    shutil.rmtree(server.data_dir)
    fresh = start_server(data_dir=tmp_path / "fresh", **store)
    answer = advance(fresh.base_url, advance_body(RECALL, state=state))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"text": "You asked me to remember heron-42.",
                             "state": {"session_id": state["session_id"], "turns": 2}}
    httpx.delete(f"{fresh.base_url}/sessions/{state['session_id']}")


def test_two_advances_at_once_on_one_state_one_is_409(start_server) -> None:
    server = start_server()
    state = advance(server.base_url, advance_body("Hello")).json()["state"]
    body = advance_body("Slowly [[delay:2]]", state=state)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: advance(server.base_url, body), range(2)))
    assert sorted(a.status_code for a in answers) == [200, 409]
    busy = next(a for a in answers if a.status_code == 409)
    assert "already running" in busy.json()["detail"]
    assert next(a for a in answers if a.status_code == 200).json()["state"]["turns"] == 2


def test_advance_through_the_gateway_is_tenant_scoped(local_gateways: Gateways) -> None:
    gateway = local_gateways.start()
    url = gateway.base_url
    assert advance(url, advance_body(REMEMBER)).status_code == 401
    first = advance(url, advance_body(REMEMBER), auth(ALICE))
    assert first.status_code == 200, first.text
    state = first.json()["state"]
    assert state["turns"] == 1 and gateway.route(state["session_id"])["tenant"] == "alice"

    second = advance(url, advance_body(RECALL, state=state), auth(ALICE))
    assert second.status_code == 200, second.text
    assert second.json()["text"] == "You asked me to remember heron-42."

    # Bob cannot continue Alice's conversation; on its id he starts his own.
    stolen = advance(url, advance_body(RECALL, state=second.json()["state"]), auth(BOB))
    assert stolen.status_code == 410 and "heron-42" not in stolen.text
    own = advance(url, advance_body(RECALL, state={"session_id": state["session_id"], "turns": 0}), auth(BOB))
    assert own.status_code == 200 and "heron-42" not in own.text
    # A conversation the gateway never saw is not started afresh; a bad body never reaches a sandbox.
    gateway.wait_pool_full()
    sandboxes = {s["sandbox_id"] for s in gateway.sandboxes()}
    unknown = advance(url, advance_body(RECALL, state={"session_id": "never-seen", "turns": 3}), auth(ALICE))
    assert unknown.status_code == 410
    image = advance(url, advance_body(blocks=[{"type": "image", "source": {}}]), auth(ALICE))
    assert image.status_code == 422 and "'image'" in image.text
    assert gateway.route("never-seen") is None
    assert {s["sandbox_id"] for s in gateway.sandboxes()} == sandboxes
