"""Dari's ``POST /runtime/advance`` through the gateway: authenticated, tenant-scoped, relayed.

The gateway does not run the advance: it validates the body with the server's own
model (so a bad request is refused before any sandbox exists), routes by the session
in the state, and relays the sandbox's answer unchanged. For a new conversation it
names the session itself (the route must exist before the sandbox does) and hands the
server a state of zero turns for it. Session ids are per tenant: a state with turns
whose session this tenant has no route for is 410 (its conversation was deleted, the
routing store lost it, or it is another tenant's), never a fresh start.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request, Response

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.budgets import Budgets
from hosting.gateway.cleanup import shielded
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.quotas import Quotas
from hosting.gateway.relay import Relay
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_response import SandboxLost, SandboxResponse, SandboxUnreachable
from hosting.gateway.telemetry import GatewayTelemetry
from hosting.runtime_api import ADVANCE_PATH, State, advance_body, new_session_id
from hosting.telemetry.tracing import tag_session

Send = Callable[[Route, Request, str, bytes], Awaitable[tuple[Route, SandboxResponse]]]


def install_runtime(app: FastAPI, *, tenant_of: Callable[[Request], Awaitable[str]], provisioner: Provisioner, quotas: Quotas,
                    budgets: Budgets, relay: Relay, send: Send, telemetry: GatewayTelemetry) -> None:
    """Add the gateway's ``POST /runtime/advance``. Tenant budgets are checked as for any
    turn, but an advance is not charged: its answer carries no usage (see
    :mod:`hosting.gateway.budgets`)."""

    @app.post(ADVANCE_PATH)
    async def advance(request: Request, tenant: str = Depends(tenant_of)) -> Response:
        body, _ = await advance_body(request)
        state = body.state
        raw = await request.body()
        if state is None:
            state = State(session_id=new_session_id(), turns=0)
            payload = json.loads(raw)
            payload["state_ref"] = {"json": state.model_dump()}
            raw = json.dumps(payload).encode()
        tag_session(state.session_id)
        with telemetry.turn(tenant) as observed:
            if not relay.accepting:
                raise HostingError("the gateway is shutting down; retry on another replica",
                                   code=ErrorCode.SHUTTING_DOWN)
            known = await provisioner.route(state.session_id, tenant)  # 503 before anything is counted
            if known is None and state.turns > 0:
                raise HostingError(f"the conversation of session {state.session_id!r} cannot be resumed: "
                                   "this gateway has no record of it", code=ErrorCode.SESSION_GONE)
            permit = await quotas.admit_turn(tenant)
            await budgets.admit(tenant, permit)  # 429 too, the permit given back
            relay.begin_turn()
            ran = False
            try:
                route = await provisioner.ensure(state.session_id, tenant, known)
                try:
                    with observed.relaying():
                        route, response = await send(route, request, ADVANCE_PATH, raw)
                    ran = True
                    try:
                        content = await response.aread()
                    finally:
                        await response.aclose()
                except (SandboxUnreachable, SandboxLost):
                    raise HostingError("the session's sandbox stopped answering; retry with the same state",
                                       code=ErrorCode.SANDBOX_LOST) from None
                await relay.touch(route.key)
                observed.answered(response.status_code, content)
            finally:
                try:
                    await shielded(permit.release() if ran else permit.refund())
                finally:
                    relay.end_turn()
        return Response(content, status_code=response.status_code, headers=response.relayed_headers())
