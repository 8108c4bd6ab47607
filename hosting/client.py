"""Python client for the agent's HTTP/SSE contract, the same at every tier.

    async with AgentClient() as agent:              # $AGENT_BASE_URL, $AGENT_AUTH_TOKEN
        print(await agent.arun("What is new in Python 3.13?"))
        async for event in agent.astream("And in 3.14?"):
            if isinstance(event, TextEvent):
                print(event.text, end="")

Only the base URL and the token change between a local server, a container,
Modal and the Kubernetes gateway.

A refused request raises a subclass of :class:`AgentClientError`, chosen by the
answer's ``code`` (:class:`hosting.errors.ErrorCode`) when it has one and by its HTTP
status otherwise (an older server, a proxy in front); each carries ``status``,
``code``, ``detail`` and ``retry_after``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource, aconnect_sse

from hosting.errors import ErrorCode

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

REATTACH_ATTEMPTS = 3
"""Re-attaches tried after a dropped connection before :class:`StreamLost`; waits 0.5, 1, 2 s."""


# -- errors ------------------------------------------------------------------


class AgentClientError(Exception):
    """The server refused a request. ``status``, ``code`` (the answer's error code, e.g.
    ``"session_busy"``; ``None`` if it sent none) and ``detail`` say why; ``retry_after``
    (seconds, from ``Retry-After``) says when to try again, ``None`` when retrying the same
    request cannot help."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.code = code


class BadRequestError(AgentClientError):
    """400 (and, as their base, 415 and 422): the request itself is wrong."""


class UnsupportedMediaTypeError(BadRequestError):
    """415: the body is not ``application/json``."""


class InvalidRequestError(BadRequestError):
    """422: the body is JSON but its fields are wrong (a missing or blank prompt, an unknown field)."""


class AuthenticationError(AgentClientError):
    """401: missing or wrong bearer token."""


class ForbiddenError(AgentClientError):
    """403: refused by whatever stands in front of the agent (an IAM proxy, say). The
    gateway never answers 403: another tenant's session id is simply not yours (404)."""


class SessionNotFoundError(AgentClientError):
    """404: no such session."""


class SessionBusyError(AgentClientError):
    """409 ``session_busy``: a turn is already running on the session; retry after ``retry_after``."""


class NoTurnRunningError(AgentClientError):
    """409 ``no_turn_running``: an interrupt found no turn to stop (:meth:`AgentClient.interrupt`
    returns ``False`` for it rather than raising)."""


class GoneError(AgentClientError):
    """410: what was asked for is gone for good: events a re-attach wanted were dropped
    (``events_gone``), or a conversation cannot be resumed (``session_gone``)."""


class RequestTimeoutError(AgentClientError):
    """408: the request's head reached the server too slowly (a stalled network); send it again."""


class PayloadTooLargeError(AgentClientError):
    """413: the body is over the server's limit."""


class HeadersTooLargeError(AgentClientError):
    """431: the request's headers are over the server's limit."""


class MisdirectedRequestError(AgentClientError):
    """421: the request reached a server that does not serve it (a server on loopback asked
    for another host name)."""


class RateLimitedError(AgentClientError):
    """429: a tenant quota is reached (``over_quota``) or a tenant budget is spent
    (``over_budget``) at the gateway; ``detail`` names which, ``retry_after`` says when to
    try again (for a budget: when its window ends)."""


class BadGatewayError(AgentClientError):
    """502: the agent or the model failed the request (``code`` says how, e.g.
    ``model_unavailable``), or a proxy in front could not reach the server."""


class NotReadyError(AgentClientError):
    """503: the server cannot take it now: starting or shutting down (``shutting_down``), no
    room for another CLI (``at_capacity``), a store or the session's sandbox unreachable
    (``store_unavailable``, ``no_sandbox``, ``sandbox_lost``); retry after ``retry_after``."""


class GatewayTimeoutError(AgentClientError):
    """504: a proxy in front of the agent gave up waiting for it."""


class StorageFullError(AgentClientError):
    """507: the server's disk has no room for a new session; existing ones keep working.
    Retry after ``retry_after``, or elsewhere."""


_BY_STATUS: dict[int, type[AgentClientError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: ForbiddenError, 404: SessionNotFoundError,
    408: RequestTimeoutError, 409: SessionBusyError, 410: GoneError, 413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError, 421: MisdirectedRequestError, 422: InvalidRequestError,
    431: HeadersTooLargeError, 429: RateLimitedError, 502: BadGatewayError,
    503: NotReadyError, 504: GatewayTimeoutError, 507: StorageFullError,
}
_BY_CODE: dict[ErrorCode, type[AgentClientError]] = {ErrorCode.NO_TURN_RUNNING: NoTurnRunningError}
"""Codes whose error is not their status's (409 is ``session_busy`` unless the code says otherwise)."""


def _error_class(status: int, code: str | None) -> type[AgentClientError]:
    """The error of an answer: by its ``code`` when this client knows it, else by its status."""
    known = ErrorCode.from_wire(code)
    if known is not None:
        return _BY_CODE.get(known) or _BY_STATUS.get(known.status, AgentClientError)
    return _BY_STATUS.get(status, AgentClientError)


class StreamLost(Exception):
    """The connection dropped mid-turn and re-attaching failed :data:`REATTACH_ATTEMPTS`
    times; the turn may still have finished on the server (see ``GET /sessions/{id}``)."""


class TurnError(Exception):
    """The turn ran but ended with an ``error`` event."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(f"{event.code}: {event.message}")
        self.event = event


# -- events (wire format v1) ---------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Any wire event. ``data`` is the JSON payload as sent, ``id`` the SSE id
    (``<turn>-<seq>``, unique within the session)."""

    id: str | None
    data: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class SessionEvent(Event):
    @property
    def session_id(self) -> str:
        return str(self.data["session_id"])

    @property
    def resumed(self) -> bool:
        return bool(self.data.get("resumed"))


@dataclass(frozen=True)
class TextEvent(Event):
    @property
    def text(self) -> str:
        return str(self.data.get("text", ""))


@dataclass(frozen=True)
class ThinkingEvent(TextEvent):
    pass


@dataclass(frozen=True)
class ToolUseEvent(Event):
    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def input(self) -> dict[str, Any]:
        return dict(self.data.get("input", {}))


@dataclass(frozen=True)
class ToolResultEvent(Event):
    @property
    def content(self) -> str:
        return str(self.data.get("content", ""))

    @property
    def is_error(self) -> bool:
        return bool(self.data.get("is_error"))


@dataclass(frozen=True)
class ResultEvent(Event):
    @property
    def text(self) -> str | None:
        return self.data.get("text")

    @property
    def is_error(self) -> bool:
        return bool(self.data.get("is_error"))


@dataclass(frozen=True)
class ErrorEvent(Event):
    @property
    def code(self) -> str:
        return str(self.data.get("code", "unknown"))

    @property
    def message(self) -> str:
        return str(self.data.get("message", ""))

    @property
    def retryable(self) -> bool:
        return bool(self.data.get("retryable"))


@dataclass(frozen=True)
class DoneEvent(Event):
    pass


@dataclass(frozen=True)
class UnknownEvent(Event):
    """An event type this client does not know (a newer server); never an error."""

    type: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    "session": SessionEvent, "text": TextEvent, "thinking": ThinkingEvent, "tool_use": ToolUseEvent,
    "tool_result": ToolResultEvent, "result": ResultEvent, "error": ErrorEvent, "done": DoneEvent,
}


def parse_event(event_type: str, event_id: str | None, data: str) -> Event:
    payload = json.loads(data) if data else {}
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        return UnknownEvent(event_id or None, payload, type=event_type)
    return cls(event_id or None, payload)


# -- client --------------------------------------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


async def _raise_for_status(response: httpx.Response) -> None:
    """The typed error of a refused request (see :func:`_error_class`)."""
    if response.status_code < 400:
        return
    await response.aread()
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail, code = body.get("detail", response.text), body.get("code")
    else:  # not our JSON: a proxy's page, say
        detail, code = response.text, None
    code = code if isinstance(code, str) else None
    raise _error_class(response.status_code, code)(response.status_code, detail, _retry_after(response), code)


async def _events(source: EventSource) -> AsyncIterator[Event]:
    async for sse in source.aiter_sse():
        if sse.data:  # empty: a heartbeat comment
            yield parse_event(sse.event, sse.id, sse.data)


class AgentClient:
    """Talks to one agent endpoint on behalf of one conversation (``session_id``)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        session_id: str | None = None,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("AGENT_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        token = token if token is not None else os.environ.get("AGENT_AUTH_TOKEN")
        self.session_id = session_id or uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def astream(self, prompt: str, *, session_id: str | None = None) -> AsyncIterator[Event]:
        """Send one turn and yield its events as they arrive, ``done`` last.

        If the connection drops before ``done``, the client re-attaches by itself
        (``GET /sessions/{id}/events`` with the last event id it yielded) and goes on:
        every event is yielded exactly once. :class:`StreamLost` if that fails."""
        sid = session_id or self.session_id
        last_id: str | None = None
        done = False
        async with aconnect_sse(self._http, "POST", f"/sessions/{sid}/messages", json={"prompt": prompt}) as source:
            await _raise_for_status(source.response)
            try:
                async for event in _events(source):
                    if done:
                        continue  # nothing follows done: the body's end is read so the connection is kept
                    last_id = event.id
                    yield event
                    done = isinstance(event, DoneEvent)
            except httpx.TransportError:
                pass  # dropped: re-attach below (after done, nothing is missing)
        if done:
            return
        async for event in self._reattach(sid, last_id):
            yield event

    async def _reattach(self, session_id: str, last_id: str | None) -> AsyncIterator[Event]:
        failure: BaseException | None = None
        for attempt in range(REATTACH_ATTEMPTS):
            await asyncio.sleep(0.5 * 2**attempt)
            headers = {"Last-Event-ID": last_id} if last_id is not None else {}
            try:
                async with aconnect_sse(self._http, "GET", f"/sessions/{session_id}/events",
                                        headers=headers) as source:
                    await _raise_for_status(source.response)
                    async for event in _events(source):
                        last_id = event.id
                        yield event
                        if isinstance(event, DoneEvent):
                            return
            except (httpx.TransportError, NotReadyError) as exc:
                failure = exc
            except AgentClientError as exc:  # 404, 410: the server no longer has the turn
                raise StreamLost(f"the connection dropped mid-turn and the turn cannot be re-attached: {exc}") from exc
        raise StreamLost(f"the connection dropped mid-turn; {REATTACH_ATTEMPTS} re-attaches failed") from failure

    async def arun(self, prompt: str, *, session_id: str | None = None) -> str:
        """Send one turn and return the final answer; :class:`TurnError` if it failed."""
        text: list[str] = []
        final: str | None = None
        async for event in self.astream(prompt, session_id=session_id):
            if isinstance(event, ErrorEvent):
                raise TurnError(event)
            if isinstance(event, ResultEvent):
                final = event.text
            elif isinstance(event, TextEvent) and not isinstance(event, ThinkingEvent):
                text.append(event.text)
        return final if final is not None else "".join(text)

    async def interrupt(self, *, session_id: str | None = None) -> bool:
        """Stop the session's running turn (its stream ends with an ``interrupted`` error).

        ``True`` if a turn was stopped, ``False`` if none was running (it may just have ended:
        a race that is no error, as with :meth:`asyncio.Task.cancel`). An unknown session raises
        :class:`SessionNotFoundError`."""
        response = await self._http.post(f"/sessions/{session_id or self.session_id}/interrupt")
        try:
            await _raise_for_status(response)
        except NoTurnRunningError:
            return False
        return True

    async def get_session(self, *, session_id: str | None = None) -> dict[str, Any]:
        session: dict[str, Any] = (await self._call("GET", f"/sessions/{session_id or self.session_id}")).json()
        return session

    async def delete_session(self, *, session_id: str | None = None) -> None:
        await self._call("DELETE", f"/sessions/{session_id or self.session_id}")

    async def ready(self) -> dict[str, Any]:
        readiness: dict[str, Any] = (await self._call("GET", "/ready")).json()
        return readiness

    async def _call(self, method: str, path: str) -> httpx.Response:
        """One plain request; the typed error for its status if it failed."""
        response = await self._http.request(method, path)
        await _raise_for_status(response)
        return response
