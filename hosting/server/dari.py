"""Dari's custom runtime protocol: ``POST /runtime/advance``, one turn per call, state held by the caller.

Request: ``{"input": {"type": "user_message", "message": {"content": [blocks]}},
"state_ref": {"json": state}}``; answer: ``{"text": ..., "state": state}``. The state is
``{"session_id": ..., "turns": N}``: the public session id and how many turns it has
had. A missing or null state starts a new conversation (a new session id); a state
with turns whose session this server cannot resume (its data gone and no session
store holding it) is refused with 410, never silently started afresh.

An advance is an ordinary turn of the session: it goes through the server's turn
machinery (one turn at a time, 409; the same tools and isolation; spans and metrics),
and its answer is the text of the turn's wire events joined; a turn that ends with an
``error`` event is answered with that code's status (:class:`~hosting.errors.ErrorCode`).
The request and the state are :mod:`hosting.runtime_api`'s, which the gateway validates
with too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.params import Depends

from hosting.contract import request_epoch
from hosting.errors import ErrorCode, HostingError
from hosting.runtime_api import ADVANCE_PATH, State, advance_body, new_session_id
from hosting.server.sessions import SessionManager
from hosting.server.turns import Turn
from hosting.telemetry.tracing import tag_session


class TurnFailed(HostingError):
    """An advance whose turn ended with an ``error`` event: answered with the event's code
    and its status, the event itself as the ``detail``, and ``Retry-After`` only if the
    event says retrying can help."""

    def __init__(self, error: dict[str, Any]) -> None:
        code = ErrorCode.from_wire(error.get("code")) or ErrorCode.AGENT_ERROR
        super().__init__({key: error.get(key) for key in ("code", "message", "retryable")}, code=code)
        if not error.get("retryable"):
            self.retry_after = None


async def answer_of(turn: Turn) -> str:
    """The text of a turn's events, joined; its first error as :class:`TurnFailed`."""
    parts: list[str] = []
    error: dict[str, Any] | None = None
    async for numbered in turn.events():
        event = numbered.event
        if event.type == "text":
            parts.append(event.data.get("text", ""))
        elif event.type == "error" and error is None:
            error = event.data
    if error is not None:
        raise TurnFailed(error)
    return "".join(parts)


class StartTurn(Protocol):
    """The server's own way to start an observed turn (see :func:`hosting.server.app.create_app`)."""

    def __call__(self, session_id: str, prompt: str, *, epoch: int | None = None) -> Awaitable[Turn]: ...


def install_runtime(app: FastAPI, sessions: SessionManager, start_turn: StartTurn, dependencies: Sequence[Depends]) -> None:
    """Add ``POST /runtime/advance`` to the server, behind ``dependencies`` (its auth)."""

    @app.post(ADVANCE_PATH, dependencies=list(dependencies))
    async def advance(request: Request) -> dict[str, Any]:
        body, prompt = await advance_body(request)
        state = body.state
        if state is None:
            state = State(session_id=new_session_id(), turns=0)
        elif state.turns > 0:
            described = await sessions.describe(state.session_id)  # StoreUnavailable: 503
            if described is None or not described["has_history"]:
                raise HostingError(f"the conversation of session {state.session_id!r} cannot be resumed: its "
                                   "history is gone from this server and no session store holds it",
                                   code=ErrorCode.SESSION_GONE)
        tag_session(state.session_id)
        turn = await start_turn(state.session_id, prompt, epoch=request_epoch(request))
        text = await answer_of(turn)
        return {"text": text, "state": {"session_id": state.session_id, "turns": state.turns + 1}}
