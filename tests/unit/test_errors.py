"""The error model in-process: the code table, the one place errors become answers, the
wire's error events, Dari's failed turns and the client's typed errors. No server, no model."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from hosting.client import (
    AgentClient,
    AgentClientError,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ForbiddenError,
    GatewayTimeoutError,
    GoneError,
    HeadersTooLargeError,
    InvalidRequestError,
    MisdirectedRequestError,
    NotReadyError,
    NoTurnRunningError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestTimeoutError,
    SessionBusyError,
    SessionNotFoundError,
    StorageFullError,
    UnsupportedMediaTypeError,
)
from hosting.contract import Unauthorized, install_error_answers, no_turn_running
from hosting.errors import ErrorCode, HostingError, StoreUnavailable
from hosting.gateway.quotas import QuotaExceeded
from hosting.gateway.routing.protocols import RoutingStoreUnavailable
from hosting.server.dari import TurnFailed
from hosting.telemetry.turns import status_error_code
from hosting.wire import error_event
from tests.support import ROOT

WIRE = {
    "bad_request": (400, None), "unauthorized": (401, None), "forbidden": (403, None), "not_found": (404, None),
    "request_timeout": (408, None), "payload_too_large": (413, None), "headers_too_large": (431, None),
    "unsupported_media_type": (415, None), "misdirected": (421, None),
    "invalid_request": (422, None), "session_busy": (409, 2), "no_turn_running": (409, None),
    "interrupted": (409, 2), "ambiguous_session": (409, None), "session_gone": (410, None),
    "events_gone": (410, None), "over_quota": (429, 2), "over_budget": (429, 2), "unavailable": (503, 2),
    "shutting_down": (503, 2), "at_capacity": (503, 2), "store_unavailable": (503, 2), "no_sandbox": (503, 2),
    "sandbox_lost": (503, 2), "superseded": (503, 2), "storage_full": (507, 30), "agent_error": (502, 2),
    "model_unavailable": (502, 2), "model_auth_failed": (502, None), "rate_limited": (429, 2),
    "overloaded": (503, 2),
}
"""Every wire code with its status and Retry-After: codes are API, so a change here is a
change of the contract (README, "The HTTP contract")."""


# --- the table ------------------------------------------------------------------------------


def test_every_code_is_unique_and_keeps_its_wire_string_status_and_retry_after() -> None:
    # A repeated value would make a silent alias: __members__ lists aliases, iteration does not.
    assert len(ErrorCode.__members__) == len(list(ErrorCode))
    assert {code.value: (code.status, code.retry_after) for code in ErrorCode} == WIRE
    for code in ErrorCode:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code.value) and code.name == code.value.upper()
        assert code.retryable is (code.retry_after is not None)


def test_the_general_code_of_a_status_is_the_first_declared_with_it() -> None:
    assert [ErrorCode.for_status(status) for status in (409, 410, 429, 503, 502, 418)] == [
        ErrorCode.SESSION_BUSY, ErrorCode.SESSION_GONE, ErrorCode.OVER_QUOTA, ErrorCode.UNAVAILABLE,
        ErrorCode.AGENT_ERROR, None]
    assert [status_error_code(status) for status in (409, 503, 418)] == ["session_busy", "unavailable", "http_418"]
    assert ErrorCode.from_wire("superseded") is ErrorCode.SUPERSEDED
    assert ErrorCode.from_wire("a_newer_code") is None and ErrorCode.from_wire(None) is None


def test_the_readme_documents_every_code_with_its_status() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| ([^|]+) \|", readme, flags=re.MULTILINE)
    documented = {code: (int(status), retry.strip() != "—") for code, status, retry in rows}
    assert documented == {code.value: (code.status, code.retryable) for code in ErrorCode}


# --- errors -------------------------------------------------------------------------------


def test_an_error_event_is_as_retryable_as_its_code_unless_told() -> None:
    assert error_event(ErrorCode.SANDBOX_LOST, "gone").data == {"code": "sandbox_lost", "message": "gone",
                                                                 "retryable": True}
    assert error_event(ErrorCode.MODEL_AUTH_FAILED, "no").data["retryable"] is False
    assert error_event(ErrorCode.AGENT_ERROR, "bad request", retryable=False).data["retryable"] is False


def test_one_store_unavailable_names_its_store_and_keeps_the_driver_error_for_the_logs() -> None:
    session = StoreUnavailable("Redis session store unreachable: 10.1.2.3:6379 refused")
    routing = RoutingStoreUnavailable("routing store unreachable: ConnectionError")
    assert isinstance(routing, StoreUnavailable) and isinstance(session, ConnectionError)
    assert session.detail == "the session store is unavailable; nothing was changed"
    assert routing.detail == "the routing store is unavailable; nothing was changed"
    assert "10.1.2.3" in str(session) and routing.code is session.code is ErrorCode.STORE_UNAVAILABLE


@pytest.mark.parametrize("event, status, retry_after", [
    ({"code": "superseded", "message": "moved", "retryable": True}, 503, 2),
    ({"code": "storage_full", "message": "full", "retryable": True}, 507, 30),
    ({"code": "agent_error", "message": "the model refused it", "retryable": False}, 502, None),
    ({"code": "a_newer_code", "message": "?", "retryable": True}, 502, 2),
])
def test_a_failed_advance_takes_the_status_of_its_code(event: dict[str, Any], status: int, retry_after: int) -> None:
    failed = TurnFailed({**event, "v": 1})
    assert (failed.code.status, failed.retry_after, failed.detail) == (status, retry_after, event)


# --- the one place errors become answers -----------------------------------------------------


class Body(BaseModel):
    prompt: str


def tiny_app(observed: list[HostingError]) -> FastAPI:
    app = FastAPI()
    install_error_answers(app, max_body_bytes=64, observe=observed.append)

    @app.get("/missing")
    async def missing() -> None:
        raise HostingError("no session 'x'", code=ErrorCode.NOT_FOUND)

    @app.get("/busy")
    async def busy() -> None:
        raise HostingError("a turn is already running on session 'x'", code=ErrorCode.SESSION_BUSY)

    @app.get("/quota")
    async def quota() -> None:
        raise QuotaExceeded("turns per minute", 3, 41.2)

    @app.get("/store")
    async def store() -> None:
        raise StoreUnavailable("postgres://admin:hunter2@db refused")

    @app.get("/token")
    async def token() -> None:
        raise Unauthorized()

    @app.get("/idle")
    async def idle() -> Any:
        return no_turn_running("x")

    @app.post("/body")
    async def body(payload: Body) -> dict[str, str]:
        return {"prompt": payload.prompt}

    return app


async def test_every_error_is_answered_with_its_detail_code_status_and_retry_after() -> None:
    observed: list[HostingError] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(tiny_app(observed)), base_url="http://app") as http:
        missing, busy, quota, store, token, idle = [await http.get(path) for path in (
            "/missing", "/busy", "/quota", "/store", "/token", "/idle")]
        invalid = await http.post("/body", json={"prompt": 1})
        too_large = await http.post("/body", json={"prompt": "x" * 100})
    assert (missing.status_code, missing.json(), "retry-after" in missing.headers) == (
        404, {"detail": "no session 'x'", "code": "not_found"}, False)
    assert (busy.status_code, busy.json()["code"], busy.headers["retry-after"]) == (409, "session_busy", "2")
    assert (quota.status_code, quota.json(), quota.headers["retry-after"]) == (
        429, {"detail": "tenant quota exceeded: turns per minute (3)", "code": "over_quota"}, "42")
    assert (store.status_code, store.json(), store.headers["retry-after"]) == (
        503, {"detail": "the session store is unavailable; nothing was changed", "code": "store_unavailable"}, "2")
    assert (token.status_code, token.json()["code"], token.headers["www-authenticate"]) == (401, "unauthorized", "Bearer")
    assert (idle.status_code, idle.json()["code"], "retry-after" in idle.headers) == (409, "no_turn_running", False)
    assert (invalid.status_code, invalid.json()["code"], invalid.json()["detail"][0]["loc"]) == (
        422, "invalid_request", ["body", "prompt"])
    assert (too_large.status_code, too_large.json()["code"]) == (413, "payload_too_large")
    assert [type(error) for error in observed] == [HostingError, HostingError, QuotaExceeded, StoreUnavailable,
                                                   Unauthorized], "observed before answering; built answers are not"


# --- the client ----------------------------------------------------------------------------


def answering(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("status, code, error", [
    (400, "bad_request", BadRequestError), (401, "unauthorized", AuthenticationError), (403, None, ForbiddenError),
    (404, "not_found", SessionNotFoundError), (409, "session_busy", SessionBusyError),
    (409, None, SessionBusyError), (409, "no_turn_running", NoTurnRunningError), (410, "events_gone", GoneError),
    (410, "session_gone", GoneError), (408, "request_timeout", RequestTimeoutError),
    (413, "payload_too_large", PayloadTooLargeError), (413, None, PayloadTooLargeError),
    (431, "headers_too_large", HeadersTooLargeError),
    (415, "unsupported_media_type", UnsupportedMediaTypeError), (421, "misdirected", MisdirectedRequestError),
    (422, "invalid_request", InvalidRequestError), (429, "over_quota", RateLimitedError),
    (429, "over_budget", RateLimitedError), (502, "model_unavailable", BadGatewayError), (502, None, BadGatewayError),
    (503, "shutting_down", NotReadyError), (503, "store_unavailable", NotReadyError),
    (504, None, GatewayTimeoutError), (507, "storage_full", StorageFullError), (418, None, AgentClientError),
    (503, "a_newer_code", NotReadyError),
])
async def test_the_client_raises_the_typed_error_of_every_status(status: int, code: str | None,
                                                                 error: type[AgentClientError]) -> None:
    body = {"detail": "why", **({"code": code} if code else {})}
    async with AgentClient("http://agent", transport=answering(status, body)) as agent:
        with pytest.raises(AgentClientError) as raised:
            await agent.get_session()
    assert type(raised.value) is error
    assert (raised.value.status, raised.value.code, raised.value.detail) == (status, code, "why")


def test_415_and_422_are_still_bad_requests_to_code_that_catches_those() -> None:
    assert issubclass(UnsupportedMediaTypeError, BadRequestError) and issubclass(InvalidRequestError, BadRequestError)


async def test_the_code_chooses_the_error_over_the_status() -> None:
    # A proxy in front may change the status; the code says what the agent meant.
    async with AgentClient("http://agent", transport=answering(500, {"detail": "full", "code": "storage_full"})) as agent:
        with pytest.raises(StorageFullError) as raised:
            await agent.get_session()
    assert raised.value.status == 500


async def test_429_carries_the_code_and_retry_after() -> None:
    body = {"detail": "tenant budget exhausted: tokens per day (100)", "code": "over_budget"}
    async with AgentClient("http://gateway", transport=answering(429, body, {"Retry-After": "3600"})) as agent:
        with pytest.raises(RateLimitedError) as raised:
            await agent.arun("hi")
    assert (raised.value.code, raised.value.retry_after, raised.value.detail) == ("over_budget", 3600.0, body["detail"])


async def test_a_proxy_page_is_typed_by_its_status_with_its_text_as_detail() -> None:
    async with AgentClient("http://agent", transport=answering(502, "<html>Bad Gateway</html>")) as agent:
        with pytest.raises(BadGatewayError) as raised:
            await agent.ready()
    assert (raised.value.code, raised.value.detail, raised.value.retry_after) == (None, "<html>Bad Gateway</html>", None)


async def test_interrupt_says_false_for_no_turn_running_and_raises_other_refusals() -> None:
    idle = {"detail": "no turn is running on session 'x'", "code": "no_turn_running"}
    async with AgentClient("http://agent", transport=answering(409, idle)) as agent:
        assert await agent.interrupt() is False
    async with AgentClient("http://agent", transport=answering(404, {"detail": "no session 'x'"})) as agent:
        with pytest.raises(SessionNotFoundError):
            await agent.interrupt()
