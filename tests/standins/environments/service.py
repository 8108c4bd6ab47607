"""A stand-in of the Claude Managed Agents environment API, for the orchestrator's tests.

Real HTTP on 127.0.0.1 (FastAPI under uvicorn on a thread); the real ``anthropic`` SDK
is pointed at it with ``base_url``. It implements the calls the SDK's poller, worker and
session tool runner make, with the service's semantics as the SDK documents them:

- ``GET  /v1/environments/{env}/work/poll``: the oldest queued item (long-poll up to
  ``block_ms``, 1-999), JSON ``null`` when there is none. A delivered item that is not
  acknowledged within ``reclaim_older_than_ms`` (default 5000) is delivered again. Only
  the poll response carries the item's ``secret`` (base64 JSON with a ``sessions_token``).
- ``POST .../work/{id}/ack``: delivered → ``starting``; 409 otherwise.
- ``POST .../work/{id}/heartbeat``: compare-and-set on ``expected_last_heartbeat``
  (``NO_HEARTBEAT`` first), 412 with the server's lease on a mismatch; ``lease_extended``
  false once stopping or stopped. A lease not renewed within its TTL (the first
  heartbeat: within ``START_LEASES`` TTLs of the ack) is lost: the item goes back to the
  queue (same id) for the next poll.
- ``POST .../work/{id}/stop``: ``force`` → ``stopped``; otherwise ``stopping``; 409 when
  already stopped.
- ``GET /v1/sessions/{id}``, ``GET /v1/sessions/{id}/events`` (cursor pages),
  ``GET /v1/sessions/{id}/events/stream`` (SSE, live events), ``POST /v1/sessions/{id}/events``.

Credentials: the environment key may call everything; an item's sessions token only its
own item's heartbeat and stop and its own session's calls (403 otherwise). Every call is
recorded with the credential it used, so tests can prove what a sandbox was given.

A scripted agent drives each session: each turn emits its tool calls one at a time
(``agent.tool_use``, then ``session.status_idle`` requiring action) and waits for each
``user.tool_result``; after the last it goes idle (``end_turn``). Creating a session, or
a message to a session without live work, queues a work item; with a webhook configured,
a signed ``session.pending`` delivery follows (standard-webhooks, like the service).

Any other endpoint is recorded in ``unexpected`` and answered 501: the fixture fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from standardwebhooks import Webhook

from harness.processes import free_port

BETA = "managed-agents-2026-04-01"
ToolCall = tuple[str, dict[str, Any]]
LIVE_STATES = ("queued", "starting", "active", "stopping")
START_LEASES = 4
"""An acknowledged item has this many lease TTLs to send its first heartbeat (a sandbox
may have to start first); after that, one TTL between heartbeats."""


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message, **extra}}, status_code=status)


@dataclass
class WorkItem:
    id: str
    session_id: str
    environment_id: str
    sessions_token: str
    created_at: str = field(default_factory=_now)
    state: str = "queued"
    delivered_at: float | None = None
    acknowledged_at: str | None = None
    started_at: str | None = None
    last_heartbeat: str | None = None
    lease_expires: float | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    deliveries: int = 0
    force_stopped: bool = False

    def secret(self) -> str:
        payload = json.dumps({"sessions_token": self.sessions_token, "ingress_token": "unused"}).encode()
        return base64.urlsafe_b64encode(payload).decode().rstrip("=")

    def json(self, *, with_secret: bool = False) -> dict[str, Any]:
        return {
            "id": self.id, "type": "work", "environment_id": self.environment_id, "state": self.state,
            "data": {"type": "session", "id": self.session_id}, "created_at": self.created_at,
            "acknowledged_at": self.acknowledged_at, "started_at": self.started_at,
            "latest_heartbeat_at": self.last_heartbeat, "stop_requested_at": self.stop_requested_at,
            "stopped_at": self.stopped_at, "metadata": {}, "secret": self.secret() if with_secret else None,
        }


@dataclass
class Session:
    id: str
    environment_id: str
    turns: list[list[ToolCall]]
    status: str = "idle"
    created_at: str = field(default_factory=_now)
    events: list[dict[str, Any]] = field(default_factory=list)
    pending: list[ToolCall] = field(default_factory=list)
    waiting_for: str | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """tool_use id → the ``user.tool_result`` event that answered it."""
    calls: dict[str, ToolCall] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id, "type": "session", "environment_id": self.environment_id, "status": self.status,
            "created_at": self.created_at, "updated_at": _now(), "archived_at": None, "title": None,
            "metadata": {}, "resources": [], "vault_ids": [], "outcome_evaluations": [], "budget": None,
            "stats": {"active_seconds": 0.0, "duration_seconds": 0.0}, "usage": {"input_tokens": 0, "output_tokens": 0},
            "agent": {"id": "agent_standin", "type": "agent", "name": "stand-in", "version": 1, "description": None,
                      "system": None, "skills": [], "mcp_servers": [], "multiagent": None,
                      "model": {"id": "claude-sonnet-4-5"},
                      "execution_identity": {"type": "service_account"},
                      "tools": [{"type": "agent_toolset_20260401"}]},
        }


@dataclass
class Call:
    method: str
    route: str
    credential: str
    """``environment_key``, ``sessions_token:<work id>`` or ``none``."""
    target: str = ""


class EnvironmentStandIn:
    """The stand-in's state and its HTTP app (see the module doc). Thread-safe: tests
    call its helpers from their own thread while uvicorn serves on another."""

    def __init__(self, *, environment_key: str, environment_id: str = "env_standin01", lease_ttl: int = 30,
                 webhook_secret: str | None = None) -> None:
        self.environment_id = environment_id
        self.environment_key = environment_key
        self.lease_ttl = lease_ttl
        self.webhook_secret = webhook_secret
        self.webhook_url: str | None = None
        self.items: dict[str, WorkItem] = {}
        self.sessions: dict[str, Session] = {}
        self.calls: list[Call] = []
        self.unexpected: list[str] = []
        self.requeued: list[str] = []
        self.webhook_statuses: list[int] = []
        self._max_active: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.app = self._build_app()
        self.base_url = ""

    # ---- what a test does -------------------------------------------------------------

    def create_session(self, *turns: list[ToolCall]) -> str:
        """A session on this environment whose agent runs ``turns[0]`` now (one work item queued)."""
        with self._lock:
            session = Session(f"sesn_{next(self._ids):04d}{secrets.token_hex(4)}", self.environment_id, list(turns))
            self.sessions[session.id] = session
            self._start_turn(session)
            item = self._enqueue(session.id)
        self._deliver_webhook(session.id)
        return item.session_id

    def next_turn(self, session_id: str) -> str | None:
        """The user sends the next message: the agent runs the next turn. Work is queued
        only if the session has no live work item; returns its id if so."""
        with self._lock:
            session = self.sessions[session_id]
            self._start_turn(session)
            live = [i for i in self.items.values() if i.session_id == session_id and i.state in LIVE_STATES]
            item = None if live else self._enqueue(session_id)
        if item is not None:
            self._deliver_webhook(session_id)
        return item.id if item else None

    def enqueue(self, session_id: str) -> str:
        """Another work item for the session (as the service queues for a dormant session)."""
        with self._lock:
            return self._enqueue(session_id).id

    def terminate(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions[session_id]
            session.status = "terminated"
            self._emit(session, {"type": "session.status_terminated"})

    def delete(self, session_id: str) -> None:
        with self._lock:
            self.sessions.pop(session_id)

    def results(self, session_id: str) -> list[tuple[str, bool, str]]:
        """(tool name, is_error, text) for every answered call, in the order they were made."""
        with self._lock:
            session = self.sessions[session_id]
            out = []
            for tool_use_id, (name, _) in session.calls.items():
                event = session.results.get(tool_use_id)
                if event is not None:
                    text = "".join(block.get("text", "") for block in event.get("content") or [])
                    out.append((name, bool(event.get("is_error")), text))
            return out

    def turn_done(self, session_id: str) -> bool:
        with self._lock:
            session = self.sessions[session_id]
            return session.status == "idle" and session.waiting_for is None and not session.pending

    def item(self, work_id: str) -> WorkItem:
        with self._lock:
            return self.items[work_id]

    def items_of(self, session_id: str) -> list[WorkItem]:
        with self._lock:
            return [i for i in self.items.values() if i.session_id == session_id]

    def max_active_leases(self, session_id: str) -> int:
        """The most items of the session that ever held a live lease at once."""
        with self._lock:
            return self._max_active.get(session_id, 0)

    def calls_of(self, route: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.route == route]

    # ---- the scripted agent -----------------------------------------------------------

    def _start_turn(self, session: Session) -> None:
        if not session.turns:
            raise AssertionError(f"session {session.id} has no turn left")
        session.pending = list(session.turns.pop(0))
        session.status = "running"
        self._emit(session, {"type": "user.message", "content": [{"type": "text", "text": "go"}]})
        self._emit(session, {"type": "session.status_running"})
        self._next_call(session)

    def _next_call(self, session: Session) -> None:
        if not session.pending:
            session.waiting_for = None
            session.status = "idle"
            self._emit(session, {"type": "session.status_idle", "stop_reason": {"type": "end_turn"}})
            return
        name, tool_input = session.pending.pop(0)
        event = self._emit(session, {"type": "agent.tool_use", "name": name, "input": tool_input,
                                     "evaluated_permission": "allow"})
        session.calls[event["id"]] = (name, tool_input)
        session.waiting_for = event["id"]
        session.status = "idle"
        self._emit(session, {"type": "session.status_idle",
                             "stop_reason": {"type": "requires_action", "event_ids": [event["id"]]}})

    def _emit(self, session: Session, event: dict[str, Any]) -> dict[str, Any]:
        event = {"id": f"sevt_{next(self._ids):06d}", "processed_at": _now(), **event}
        session.events.append(event)
        return event

    def _enqueue(self, session_id: str) -> WorkItem:
        item = WorkItem(f"work_{next(self._ids):04d}{secrets.token_hex(4)}", session_id, self.environment_id,
                        f"sst_{secrets.token_urlsafe(24)}")
        self.items[item.id] = item
        return item

    def _deliver_webhook(self, session_id: str) -> None:
        if self.webhook_url is None or self.webhook_secret is None:
            return
        self.post_webhook({"type": "event", "id": f"wevt_{secrets.token_hex(8)}", "created_at": _now(),
                           "data": {"type": "session.pending", "id": session_id,
                                    "organization_id": "org_standin", "workspace_id": "wrkspc_standin"}})

    def post_webhook(self, event: dict[str, Any], *, secret: str | None = None) -> int:
        """Sign ``event`` (with ``secret``, default the configured one) and deliver it."""
        assert self.webhook_url is not None
        payload = json.dumps(event)
        message_id = f"msg_{secrets.token_hex(8)}"
        stamp = datetime.now(UTC)
        signature = Webhook(secret or self.webhook_secret or "").sign(message_id, stamp, payload)
        headers = {"webhook-id": message_id, "webhook-timestamp": str(int(stamp.timestamp())),
                   "webhook-signature": signature, "content-type": "application/json"}
        status = httpx.post(self.webhook_url, content=payload, headers=headers, timeout=10).status_code
        self.webhook_statuses.append(status)
        return status

    # ---- the service ------------------------------------------------------------------

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for item in self.items.values():
            if item.state in ("starting", "active") and item.lease_expires is not None and item.lease_expires < now:
                item.state, item.delivered_at, item.acknowledged_at = "queued", None, None
                item.last_heartbeat, item.lease_expires, item.started_at = None, None, None
                self.requeued.append(item.id)

    def _credential(self, request: Request) -> tuple[str, WorkItem | None]:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if token and secrets.compare_digest(token, self.environment_key):
            return "environment_key", None
        for item in self.items.values():
            if token and secrets.compare_digest(token, item.sessions_token):
                return f"sessions_token:{item.id}", item
        return "none", None

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        standin = self

        def admit(request: Request, route: str, target: str, *, work_id: str | None = None,
                  session_id: str | None = None) -> JSONResponse | None:
            """Record the call; the error response if its credential may not make it."""
            credential, token_item = standin._credential(request)
            standin.calls.append(Call(request.method, route, credential, target))
            if BETA not in request.headers.get("anthropic-beta", ""):
                standin.unexpected.append(f"{route} without the {BETA} beta header")
                return _error(400, "invalid_request_error", "beta header missing")
            if credential == "none":
                return _error(401, "authentication_error", "invalid credential")
            if token_item is not None:
                scoped = (work_id is not None and work_id == token_item.id) or (
                    session_id is not None and session_id == token_item.session_id)
                if not scoped:
                    return _error(403, "permission_error", "this token is scoped to another work item")
            return None

        def environment(environment_id: str) -> JSONResponse | None:
            if environment_id != standin.environment_id:
                return _error(404, "not_found_error", f"environment {environment_id} not found")
            return None

        @app.get("/v1/environments/{environment_id}/work/poll")
        async def poll(environment_id: str, request: Request) -> Response:
            with standin._lock:
                refused = admit(request, "poll", environment_id) or environment(environment_id)
                if refused:
                    return refused
                if standin._credential(request)[0] != "environment_key":
                    return _error(403, "permission_error", "polling needs the environment key")
            query = request.query_params
            block_ms = int(query["block_ms"]) if "block_ms" in query else 0
            if "block_ms" in query and not 1 <= block_ms <= 999:
                return _error(400, "invalid_request_error", "block_ms must be 1-999")
            reclaim = int(query.get("reclaim_older_than_ms", 5000)) / 1000
            deadline = time.monotonic() + block_ms / 1000
            while True:
                with standin._lock:
                    standin._expire_leases()
                    now = time.monotonic()
                    for item in sorted(standin.items.values(), key=lambda i: i.created_at):
                        if item.state == "queued" and (item.delivered_at is None or now - item.delivered_at > reclaim):
                            item.delivered_at, item.deliveries = now, item.deliveries + 1
                            standin.calls.append(Call("GET", "poll.delivered", "environment_key", item.id))
                            return JSONResponse(item.json(with_secret=True))
                if time.monotonic() >= deadline:
                    return Response("null", media_type="application/json")
                await asyncio.sleep(0.02)

        def work_item(request: Request, route: str, environment_id: str, work_id: str) -> WorkItem | Response:
            """The work item a call on ``route`` names, once the call is admitted; else the refusal."""
            refused = admit(request, route, work_id, work_id=work_id) or environment(environment_id)
            if refused:
                return refused
            item = standin.items.get(work_id)
            return item if item is not None else _error(404, "not_found_error", f"work {work_id} not found")

        @app.get("/v1/environments/{environment_id}/work/{work_id}")
        async def retrieve_work(environment_id: str, work_id: str, request: Request) -> Response:
            with standin._lock:
                item = work_item(request, "work.retrieve", environment_id, work_id)
                if not isinstance(item, WorkItem):
                    return item
                standin._expire_leases()
                return JSONResponse(item.json())

        @app.post("/v1/environments/{environment_id}/work/{work_id}/ack")
        async def ack(environment_id: str, work_id: str, request: Request) -> Response:
            with standin._lock:
                item = work_item(request, "ack", environment_id, work_id)
                if not isinstance(item, WorkItem):
                    return item
                standin._expire_leases()
                if item.state != "queued" or item.delivered_at is None:
                    return _error(409, "conflict_error", f"work {work_id} is {item.state}, not delivered")
                item.state, item.acknowledged_at = "starting", _now()
                item.lease_expires = time.monotonic() + standin.lease_ttl * START_LEASES
                return JSONResponse(item.json())

        @app.post("/v1/environments/{environment_id}/work/{work_id}/heartbeat")
        async def heartbeat(environment_id: str, work_id: str, request: Request) -> Response:
            with standin._lock:
                item = work_item(request, "heartbeat", environment_id, work_id)
                if not isinstance(item, WorkItem):
                    return item
                standin._expire_leases()
                lease = {"state": item.state, "last_heartbeat": item.last_heartbeat,
                         "ttl_seconds": standin.lease_ttl, "lease_extended": False}
                if item.state in ("stopping", "stopped"):
                    return JSONResponse({**lease, "type": "work_heartbeat", "last_heartbeat": item.last_heartbeat or ""})
                expected = request.query_params.get("expected_last_heartbeat")
                if item.state == "queued" or expected != (item.last_heartbeat or "NO_HEARTBEAT"):
                    return _error(412, "precondition_failed_error", "expected_last_heartbeat does not match",
                                  details={"error_code": "heartbeat_precondition_failed", "current_state": lease})
                item.last_heartbeat = _now()
                item.state, item.started_at = "active", item.started_at or item.last_heartbeat
                item.lease_expires = time.monotonic() + standin.lease_ttl
                active = sum(1 for i in standin.items.values() if i.session_id == item.session_id and i.state == "active")
                standin._max_active[item.session_id] = max(active, standin._max_active.get(item.session_id, 0))
                return JSONResponse({"type": "work_heartbeat", "state": "active", "last_heartbeat": item.last_heartbeat,
                                     "lease_extended": True, "ttl_seconds": standin.lease_ttl})

        @app.post("/v1/environments/{environment_id}/work/{work_id}/stop")
        async def stop(environment_id: str, work_id: str, request: Request) -> Response:
            body = json.loads(await request.body() or b"{}")
            with standin._lock:
                item = work_item(request, "stop", environment_id, work_id)
                if not isinstance(item, WorkItem):
                    return item
                if item.state == "stopped":
                    return _error(409, "conflict_error", f"work {work_id} is already stopped")
                if body.get("force") or item.state == "queued":
                    item.state, item.stopped_at, item.force_stopped = "stopped", _now(), bool(body.get("force"))
                else:
                    item.state, item.stop_requested_at = "stopping", _now()
                return JSONResponse(item.json())

        def session_of(session_id: str) -> Session | JSONResponse:
            session = standin.sessions.get(session_id)
            return session if session is not None else _error(404, "not_found_error", f"session {session_id} not found")

        @app.get("/v1/sessions/{session_id}")
        async def retrieve_session(session_id: str, request: Request) -> Response:
            with standin._lock:
                session = admit(request, "session.retrieve", session_id, session_id=session_id) or session_of(session_id)
                return JSONResponse(session.json()) if isinstance(session, Session) else session

        @app.get("/v1/sessions/{session_id}/events")
        async def list_events(session_id: str, request: Request) -> Response:
            with standin._lock:
                session = admit(request, "events.list", session_id, session_id=session_id) or session_of(session_id)
                if not isinstance(session, Session):
                    return session
                query = request.query_params
                if query.get("order", "asc") != "asc":
                    standin.unexpected.append("events.list with order=desc")
                start = int(query.get("page") or 0)
                limit = int(query.get("limit") or 20)
                page = session.events[start:start + limit]
                more = start + limit < len(session.events)
                return JSONResponse({"data": page, "next_page": str(start + limit) if more else None})

        @app.get("/v1/sessions/{session_id}/events/stream")
        async def stream_events(session_id: str, request: Request) -> Response:
            with standin._lock:
                session = admit(request, "events.stream", session_id, session_id=session_id) or session_of(session_id)
                if not isinstance(session, Session):
                    return session
                seen = len(session.events)

            async def events() -> Any:
                nonlocal seen
                last_ping = time.monotonic()
                while not await request.is_disconnected():
                    with standin._lock:
                        fresh = session.events[seen:]
                        seen += len(fresh)
                    for event in fresh:
                        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                    if time.monotonic() - last_ping > 1:
                        last_ping = time.monotonic()
                        yield "event: ping\ndata: {}\n\n"
                    await asyncio.sleep(0.02)

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/sessions/{session_id}/events")
        async def send_events(session_id: str, request: Request) -> Response:
            body = json.loads(await request.body() or b"{}")
            with standin._lock:
                session = admit(request, "events.send", session_id, session_id=session_id) or session_of(session_id)
                if not isinstance(session, Session):
                    return session
                if session.status == "terminated":
                    return _error(400, "invalid_request_error", "the session has terminated")
                sent = []
                for event in body.get("events") or []:
                    if event.get("type") != "user.tool_result":
                        standin.unexpected.append(f"events.send of {event.get('type')}")
                        return _error(400, "invalid_request_error", "unexpected event type")
                    if event.get("tool_use_id") not in session.calls or event["tool_use_id"] in session.results:
                        return _error(400, "invalid_request_error", "no such open tool call")
                    recorded = standin._emit(session, event)
                    session.results[event["tool_use_id"]] = recorded
                    sent.append(recorded)
                    if event["tool_use_id"] == session.waiting_for:
                        session.status = "running"
                        standin._emit(session, {"type": "session.status_running"})
                        standin._next_call(session)
                return JSONResponse({"data": sent})

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def anything_else(path: str, request: Request) -> Response:
            with standin._lock:
                standin.unexpected.append(f"{request.method} /{path}")
            return _error(501, "api_error", f"the stand-in does not implement {request.method} /{path}")

        return app


def serve(standin: EnvironmentStandIn) -> Iterator[EnvironmentStandIn]:
    """Serve ``standin`` on 127.0.0.1 until the generator is closed; then fail if any
    call went to an endpoint it does not implement."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(standin.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the environment stand-in did not start")
        time.sleep(0.02)
    standin.base_url = f"http://127.0.0.1:{port}"
    try:
        yield standin
    finally:
        server.should_exit = True
        thread.join(10)
    assert not standin.unexpected, f"calls the stand-in does not implement: {standin.unexpected}"
