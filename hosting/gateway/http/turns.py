"""A session's turns: send one (``POST .../messages``), re-attach to it (``GET .../events``), interrupt it.

The hot route is ``POST /sessions/{session_id}/messages``: a :class:`DirectRoute` on the
app's own router, matched first, that reads its own parameters (:func:`add_message_route`). Its turn is admitted and
sent by :func:`relayed_turn`; what is its own is the relayed stream, which holds the
turn's slot until the sandbox's turn ends and charges the tenant's budget as each
``result`` goes by.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from hosting.contract import SESSION_ID_PARAMETER, SessionId, message_body, no_turn_running, path_session_id
from hosting.errors import ErrorCode, HostingError
from hosting.gateway.event_stream import lost_stream
from hosting.gateway.http.dependencies import Services, Tenant, services_of, tenant_of
from hosting.gateway.http.direct_route import DirectRoute
from hosting.gateway.http.exchange import owned_route, relayed
from hosting.gateway.http.relayed_turn import RelayedTurn, relayed_turn
from hosting.gateway.relayed_stream import RelayedStream
from hosting.gateway.sandbox_response import SandboxLost, SandboxResponse, SandboxUnreachable
from hosting.gateway.services import GatewayServices
from hosting.gateway.telemetry import GatewayTurn

logger = logging.getLogger("hosting.gateway")

router = APIRouter()


async def post_message(request: Request) -> Response:
    session_id = path_session_id(request.path_params["session_id"])
    tenant = await tenant_of(request)
    _, raw = await message_body(request)
    services = services_of(request)
    with services.telemetry.turn(tenant) as observed:
        async with relayed_turn(services, tenant, session_id, observed) as turn:
            try:
                response = await turn.send(request, f"/sessions/{session_id}/messages", raw)
            except (SandboxUnreachable, SandboxLost) as exc:
                logger.warning("session %s: sandbox lost before the turn started: %s", session_id, exc)
                observed.lost()
                return StreamingResponse(iter([lost_stream(None, "the session's sandbox could not take the turn; "
                                                                 "send it again")]), media_type="text/event-stream")
            if response.status_code != 200:  # refused by the sandbox (409, 422, ...): not counted
                observed.refused_by_sandbox(response.status_code)
                try:
                    return relayed(response, await response.aread())
                finally:
                    await response.aclose()
            return _charged_stream(services, turn, response, observed, tenant, session_id)


def _charged_stream(services: GatewayServices, turn: RelayedTurn, response: SandboxResponse, observed: GatewayTurn,
                    tenant: str, session_id: str) -> RelayedStream:
    """The turn's stream, relayed: it holds the turn's slot until the sandbox's turn ends
    (however the client behaves) and charges the tenant's budget as each ``result`` goes by."""
    charge = services.budgets.charge(tenant, session_id)
    observed.on_result = charge.result  # the turn's spend is counted as its result is relayed
    permit = turn.permit

    async def turn_over() -> None:  # before done goes out: the next turn finds the slot free, the spend counted
        try:
            await permit.release()
        finally:
            await charge.settled()

    end_turn = turn.hand_over()

    async def finished() -> None:
        try:
            await end_turn()
        finally:
            observed.finish()

    observed.streaming = True
    return RelayedStream(services.relay.stream(turn.route, response, on_end=turn_over, observer=observed.saw),
                         response.relayed_headers(),
                         on_close=finished,
                         while_open=permit.keep_alive if permit.holds_slot else None)


def add_message_route(app: FastAPI) -> None:
    """Add the hot route to the app's own router, before any other so it is matched first,
    as a :class:`DirectRoute` (it reads its parameters itself). Not in :data:`router`:
    FastAPI resolves an included router's routes through it on every request."""
    app.router.add_api_route("/sessions/{session_id}/messages", post_message, methods=["POST"],
                             openapi_extra=SESSION_ID_PARAMETER, route_class_override=DirectRoute)


@router.get("/sessions/{session_id}/events")
async def reattach(session_id: SessionId, tenant: Tenant, services: Services, request: Request) -> Response:
    """Relay a re-attach to the session's sandbox. Never provisions: a new sandbox
    has no turn to re-attach to."""
    route = await owned_route(services, session_id, tenant)
    gone = HostingError(f"no turn of session {session_id!r} to re-attach to (its sandbox is gone)",
                        code=ErrorCode.NOT_FOUND)
    if route.sandbox_id is None:
        raise gone
    path = f"/sessions/{session_id}/events"
    if request.url.query:
        path = f"{path}?{request.url.query}"
    try:
        response = await services.relay.send(route, "GET", path, request.headers)
    except (SandboxUnreachable, SandboxLost):
        raise gone from None
    if response.status_code != 200:
        try:
            return relayed(response, await response.aread())
        finally:
            await response.aclose()
    return RelayedStream(services.relay.stream(route, response), response.relayed_headers())


@router.post("/sessions/{session_id}/interrupt")
async def interrupt(session_id: SessionId, tenant: Tenant, services: Services, request: Request) -> Response:
    route = await owned_route(services, session_id, tenant)
    if route.sandbox_id is None:
        return no_turn_running(session_id)
    try:
        response = await services.relay.send(route, "POST", f"/sessions/{session_id}/interrupt", request.headers)
        body = await response.aread()
        await response.aclose()
    except (SandboxUnreachable, SandboxLost):
        return no_turn_running(session_id)  # a sandbox that is gone runs no turn
    return relayed(response, body)  # the sandbox's own answer: 200, or 409 no_turn_running
