"""Dari's ``POST /runtime/advance`` through the gateway: authenticated, tenant-scoped, relayed.

The gateway does not run the advance: it validates the body with the server's own
model (so a bad request is refused before any sandbox exists), routes by the session
in the state, and relays the sandbox's answer unchanged. For a new conversation it
names the session itself (the route must exist before the sandbox does) and hands the
server a state of zero turns for it. Session ids are per tenant: a state with turns
whose session this tenant has no route for is 410 (its conversation was deleted, the
routing store lost it, or it is another tenant's), never a fresh start.

The turn is admitted and sent as any other (:func:`relayed_turn`); its answer is read
whole. Tenant budgets are checked as for any turn, but an advance is not charged: its
answer carries no usage (see :mod:`hosting.gateway.budgets`).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.http.dependencies import Services, Tenant
from hosting.gateway.http.exchange import relayed
from hosting.gateway.http.relayed_turn import relayed_turn
from hosting.gateway.sandbox_response import SandboxLost, SandboxUnreachable
from hosting.runtime_api import ADVANCE_PATH, State, advance_body, new_session_id
from hosting.telemetry.tracing import tag_session

router = APIRouter()


@router.post(ADVANCE_PATH)
async def advance(request: Request, tenant: Tenant, services: Services) -> Response:
    body, _ = await advance_body(request)
    state = body.state
    raw = await request.body()
    if state is None:
        state = State(session_id=new_session_id(), turns=0)
        payload = json.loads(raw)
        payload["state_ref"] = {"json": state.model_dump()}
        raw = json.dumps(payload).encode()
    tag_session(state.session_id)
    with services.telemetry.turn(tenant) as observed:
        async with relayed_turn(services, tenant, state.session_id, observed, continuing=state.turns > 0) as turn:
            try:
                response = await turn.send(request, ADVANCE_PATH, raw)
                turn.keep_counted()
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
            except (SandboxUnreachable, SandboxLost):
                raise HostingError("the session's sandbox stopped answering; retry with the same state",
                                   code=ErrorCode.SANDBOX_LOST) from None
            await services.relay.touch(turn.route.key)
            observed.answered(response.status_code, content)
    return relayed(response, content)
