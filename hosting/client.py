"""Python client for the agent's HTTP/SSE contract, the same at every tier.

    async with AgentClient() as agent:              # $AGENT_BASE_URL, $AGENT_AUTH_TOKEN
        print(await agent.arun("What is new in Python 3.13?"))
        async for event in agent.astream("And in 3.14?"):
            if isinstance(event, TextEvent):
                print(event.text, end="")

Only the base URL and the token change between a local server, a container,
Modal and the Kubernetes gateway.
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

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

REATTACH_ATTEMPTS = 3
"""Re-attaches tried after a dropped connection before :class:`StreamLost`; waits 0.5, 1, 2 s."""


# -- errors ------------------------------------------------------------------


class AgentClientError(Exception):
    """The server refused a request. ``status`` and ``detail`` say why."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class BadRequestError(AgentClientError):
    """400, 415 or 422: the request itself is wrong."""


class AuthenticationError(AgentClientError):
    """401: missing or wrong bearer token."""


class ForbiddenError(AgentClientError):
    """403: refused by whatever stands in front of the agent (an IAM proxy, say). The
    gateway never answers 403: another tenant's session id is simply not yours (404)."""


class SessionNotFoundError(AgentClientError):
    """404: no such session."""


class SessionBusyError(AgentClientError):
    """409: a turn is already running on the session; retry after ``retry_after``."""


NO_TURN_RUNNING = "no_turn_running"
"""The ``code`` of the 409 an interrupt gets when no turn is running (``hosting.contract``);
:meth:`AgentClient.interrupt` returns ``False`` for it rather than raising."""


class PayloadTooLargeError(AgentClientError):
    """413: the body is over the server's limit."""


class RateLimitedError(AgentClientError):
    """429: a tenant quota is reached or a tenant budget is spent (the gateway); ``detail``
    names which, ``retry_after`` says when to try again (for a budget: when its window ends)."""


class NotReadyError(AgentClientError):
    """503: the server is starting or draining; retry after ``retry_after``."""


class StorageFullError(AgentClientError):
    """507: the server's disk has no room for a new session; existing ones keep working.
    Retry after ``retry_after``, or elsewhere."""


_ERRORS: dict[int, type[AgentClientError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: ForbiddenError, 404: SessionNotFoundError,
    409: SessionBusyError, 413: PayloadTooLargeError, 415: BadRequestError, 422: BadRequestError,
    429: RateLimitedError, 503: NotReadyError, 507: StorageFullError,
}


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
        return self.data["session_id"]

    @property
    def resumed(self) -> bool:
        return bool(self.data.get("resumed"))


@dataclass(frozen=True)
class TextEvent(Event):
    @property
    def text(self) -> str:
        return self.data.get("text", "")


@dataclass(frozen=True)
class ThinkingEvent(TextEvent):
    pass


@dataclass(frozen=True)
class ToolUseEvent(Event):
    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def input(self) -> dict[str, Any]:
        return self.data.get("input", {})


@dataclass(frozen=True)
class ToolResultEvent(Event):
    @property
    def content(self) -> str:
        return self.data.get("content", "")

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
        return self.data.get("code", "unknown")

    @property
    def message(self) -> str:
        return self.data.get("message", "")

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


def _error_code(response: httpx.Response) -> str | None:
    """The ``code`` of a JSON error body, if it has one."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


async def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    await response.aread()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    cls = _ERRORS.get(response.status_code, AgentClientError)
    raise cls(response.status_code, detail, _retry_after(response))


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
        if response.status_code == 409 and _error_code(response) == NO_TURN_RUNNING:
            return False
        await _raise_for_status(response)
        return True

    async def get_session(self, *, session_id: str | None = None) -> dict[str, Any]:
        return (await self._call("GET", f"/sessions/{session_id or self.session_id}")).json()

    async def delete_session(self, *, session_id: str | None = None) -> None:
        await self._call("DELETE", f"/sessions/{session_id or self.session_id}")

    async def ready(self) -> dict[str, Any]:
        return (await self._call("GET", "/ready")).json()

    async def _call(self, method: str, path: str) -> httpx.Response:
        """One plain request; the typed error for its status if it failed."""
        response = await self._http.request(method, path)
        await _raise_for_status(response)
        return response
