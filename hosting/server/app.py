"""The agent server: the HTTP/SSE contract, one process per sandbox.

Routes (identical at every tier, see README):
``GET /health`` · ``GET /ready`` · ``POST /sessions/{id}/messages`` (SSE) ·
``GET /sessions/{id}/events`` (SSE, re-attach) · ``POST /sessions/{id}/interrupt`` ·
``GET /sessions/{id}`` · ``DELETE /sessions/{id}``.

Validation happens before anything is created: a bad request never reaches the
model and leaves nothing on disk.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from hosting.contract import (
    RETRY_AFTER_SECONDS,
    SessionId,
    Unauthorized,
    bearer_token,
    install_error_answers,
    message_body,
    no_turn_running,
    request_epoch,
    request_namespace,
    tokens_equal,
)
from hosting.draining import DrainingServer
from hosting.errors import ErrorCode, HostingError
from hosting.server.api_docs import install_api_docs
from hosting.server.dari import install_runtime
from hosting.server.disk import StorageFull
from hosting.server.loopback import LoopbackHostOnly
from hosting.server.sessions import SessionManager
from hosting.server.settings import Settings
from hosting.server.telemetry import ServerTelemetry
from hosting.server.turns import Numbered, Turn
from hosting.server.workspaces import WorkspaceStore
from hosting.settings_env import ConfigError
from hosting.stores import MissingStoreDriver, open_session_store
from hosting.telemetry.http import FASTAPI_TELEMETRY
from hosting.telemetry.logs import configure_logging
from hosting.web import mount_chat_page
from hosting.wire import server_sent

logger = logging.getLogger("hosting.server")


def create_app(settings: Settings) -> FastAPI:
    """Build the server for ``settings``. The caller has checked credentials."""
    workspaces = WorkspaceStore(settings.data_dir)
    store = (open_session_store(settings.session_store_url, ttl_seconds=settings.session_ttl_seconds)
             if settings.session_store_url else None)
    sessions = SessionManager(settings, workspaces, store)
    telemetry = ServerTelemetry(settings.telemetry, settings.model)
    telemetry.observe_sessions(sessions.status)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        workspaces.ensure_writable()
        logger.info("%s: up to %d CLIs at once (%d warm, %d pre-started, %d starting at once)",
                    settings.box.describe(), settings.cli_budget, settings.warm_sessions, sessions.prewarm_target,
                    settings.max_starting_clis)
        if (warning := settings.fit_warning()) is not None:
            logger.warning("%s", warning)
        if store is not None:
            try:
                await store.ping()
            except Exception as exc:  # noqa: BLE001 - serve from local disk; restores retry per turn
                logger.warning("session store unreachable at start-up: %s", exc)
        await sessions.start()
        yield
        await sessions.close()  # after SIGTERM, DrainingServer has closed them by the deadline already
        if store is not None:
            await store.aclose()
        telemetry.shutdown()

    async def require_token(request: Request) -> None:  # async: no worker-thread hop per request
        if settings.auth_token is None:
            return
        token = bearer_token(request)
        if token is None or not tokens_equal(token, settings.auth_token):
            raise Unauthorized()

    # FastAPI's own /docs and /redoc load scripts from a CDN: off; AGENT_API_DOCS=1 serves a same-origin page.
    app = FastAPI(title="Research agent server", version="1", lifespan=lifespan, telemetry=FASTAPI_TELEMETRY,
                  docs_url=None, redoc_url=None)
    install_error_answers(app, settings.max_body_bytes)
    mount_chat_page(app)
    if settings.api_docs:
        install_api_docs(app)
    app.state.sessions = sessions
    async def serve_namespace(request: Request) -> None:
        sessions.serve_namespace(request_namespace(request))

    authed = [Depends(require_token)]
    scoped = [*authed, Depends(serve_namespace)]
    """Session routes: authenticated, then in this server's namespace (behind a gateway)."""
    telemetry.install(app, [settings.auth_token, settings.telemetry.metrics_token])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", dependencies=authed)
    async def ready() -> JSONResponse:
        await sessions.check_disk()
        status = sessions.status()
        ok = sessions.accepting and not status["disk_over_budget"]
        headers = {} if ok else {"Retry-After": RETRY_AFTER_SECONDS}
        return JSONResponse({"ready": ok, **status}, status_code=200 if ok else 503, headers=headers)

    @app.post("/sessions/{session_id}/messages", dependencies=scoped)
    async def post_message(session_id: SessionId, request: Request) -> EventSourceResponse:
        body, _ = await message_body(request)
        turn = await start_turn(session_id, body.prompt, include_raw=body.include_raw, epoch=request_epoch(request))
        return EventSourceResponse(_sse(turn.events()), ping=settings.heartbeat_seconds)

    async def start_turn(session_id: str, prompt: str, *, include_raw: bool = False, epoch: int | None = None) -> Turn:
        """Start a turn, observed (span, metrics); a refusal is a :class:`HostingError` (answered by
        :func:`~hosting.contract.install_error_answers`)."""
        with telemetry.turns.starting(session_id) as starting:
            try:
                turn = await sessions.start_turn(session_id, prompt, include_raw=include_raw, epoch=epoch)
            except StorageFull as exc:
                logger.warning("session %s refused (507): %s", session_id, exc)
                raise
            starting.follow(turn)
        return turn

    install_runtime(app, sessions, start_turn, scoped)

    @app.get("/sessions/{session_id}/events", dependencies=scoped)
    async def reattach(session_id: SessionId, request: Request,
                       after: str | None = Query(None, max_length=64)) -> EventSourceResponse:
        """Re-attach to the session's running or last turn after a dropped connection:
        the events after ``Last-Event-ID`` (or ``?after=``), then the live turn to ``done``."""
        last_seen = after if after is not None else request.headers.get("last-event-id")
        try:
            events = sessions.reattach(session_id, last_seen)
        except ValueError as exc:
            raise HostingError(str(exc), code=ErrorCode.BAD_REQUEST) from None
        if events is None:
            raise HostingError(f"no turn of session {session_id!r} to re-attach to", code=ErrorCode.NOT_FOUND)
        return EventSourceResponse(_sse(events), ping=settings.heartbeat_seconds)

    @app.post("/sessions/{session_id}/interrupt", dependencies=scoped)
    async def interrupt(session_id: SessionId) -> Any:
        if not await sessions.interrupt(session_id):
            if workspaces.get(session_id) is None:
                raise _not_found(session_id)
            return no_turn_running(session_id)
        return {"session_id": session_id, "interrupted": True}

    @app.get("/sessions/{session_id}", dependencies=scoped)
    async def get_session(session_id: SessionId) -> dict[str, Any]:
        described = await sessions.describe(session_id)
        if described is None:
            raise _not_found(session_id)
        return described

    @app.delete("/sessions/{session_id}", dependencies=scoped, status_code=204)
    async def delete_session(session_id: SessionId) -> Response:
        if not await sessions.delete(session_id):
            raise _not_found(session_id)
        return Response(status_code=204)

    if settings.on_loopback:  # outermost: a misdirected request reaches nothing
        app.add_middleware(LoopbackHostOnly)
    return app


def _not_found(session_id: str) -> HostingError:
    return HostingError(f"no session {session_id!r}", code=ErrorCode.NOT_FOUND)


async def _sse(events: AsyncIterator[Numbered]) -> AsyncIterator[ServerSentEvent]:
    async for numbered in events:
        yield server_sent(numbered.event, numbered.id)


def main() -> None:
    """``agent-server`` / ``entrypoint.sh serve``: serve on ``$HOST:$PORT`` with settings from the environment."""
    try:
        settings = Settings.from_env()
        configure_logging(settings.telemetry.log_format)
        settings.require_credentials()
        WorkspaceStore(settings.data_dir).ensure_writable()
        app = create_app(settings)
        settings.require_auth_off_loopback()
    except (ConfigError, MissingStoreDriver, OSError) as exc:
        print(f"agent-server: {exc}", file=sys.stderr)
        sys.exit(2)
    sessions = app.state.sessions
    DrainingServer(app, settings.host, settings.port, sessions, settings.shutdown_grace_seconds, settings.http,
                   stop_work=sessions.close).run()

