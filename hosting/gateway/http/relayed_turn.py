"""One turn through the gateway, from admission to what it must give back.

A turn reaches its sandbox the same way whichever route carries it (``POST
/sessions/{id}/messages`` or Dari's ``POST /runtime/advance``): refused while the gateway
drains, routed (503 before anything is counted), admitted by the tenant's quotas and
budget (429 before anything is provisioned), counted for the drain, its sandbox ensured,
then sent. However it ends, what it took is given back exactly once: its quota permit
refunded (a turn that never ran is not counted) or released (it ran), and the drain told
it is over. The routes keep only what differs: what they do with the sandbox's answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Request

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.cleanup import shielded
from hosting.gateway.http.exchange import send
from hosting.gateway.quotas import TurnPermit
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_response import SandboxResponse
from hosting.gateway.services import GatewayServices
from hosting.gateway.telemetry import GatewayTurn


class RelayedTurn:
    """A turn admitted, its sandbox ensured (see :func:`relayed_turn`)."""

    def __init__(self, services: GatewayServices, route: Route, permit: TurnPermit, observed: GatewayTurn) -> None:
        self.route = route
        """The session's route; a replacement's once :meth:`send` had to replace the sandbox."""
        self.permit = permit
        self._services = services
        self._observed = observed
        self._counted = False
        self._handed_over = False

    @property
    def counted(self) -> bool:
        return self._counted

    @property
    def handed_over(self) -> bool:
        return self._handed_over

    async def send(self, request: Request, path: str, body: bytes) -> SandboxResponse:
        """Send the turn to the sandbox (another one, once, if it cannot be reached), in the
        relay's span; the response is open for streaming (close it)."""
        with self._observed.relaying():
            self.route, response = await send(self._services, self.route, request, path, body)
        return response

    def keep_counted(self) -> None:
        """The sandbox took the turn: it stays counted in the tenant's window (its permit
        released, not refunded, at the end)."""
        self._counted = True

    def hand_over(self) -> Callable[[], Awaitable[None]]:
        """The turn now ends with a relayed stream, not with the block: the step returned
        (for the stream's close) frees its slot and tells the drain it is over."""
        self._handed_over = True

        async def end() -> None:
            try:
                await self.permit.release()
            finally:
                self._services.relay.end_turn()

        return end


@asynccontextmanager
async def relayed_turn(services: GatewayServices, tenant: str, session_id: str, observed: GatewayTurn, *,
                       continuing: bool = False) -> AsyncIterator[RelayedTurn]:
    """Admit a turn of the tenant's session and ensure its sandbox, for the block to send it.

    ``continuing``: the client says the conversation has turns already, so a session this
    tenant has no route for is gone (410), never started afresh. On leaving the block the
    permit is refunded, or released after :meth:`RelayedTurn.keep_counted`, unless the
    turn was handed to a stream (:meth:`RelayedTurn.hand_over`)."""
    relay = services.relay
    if not relay.accepting:
        raise HostingError("the gateway is shutting down; retry on another replica", code=ErrorCode.SHUTTING_DOWN)
    known = await services.provisioner.route(session_id, tenant)  # 503 before anything is counted
    if known is None and continuing:
        raise HostingError(f"the conversation of session {session_id!r} cannot be resumed: "
                           "this gateway has no record of it", code=ErrorCode.SESSION_GONE)
    permit = await services.quotas.admit_turn(tenant)  # 429 before anything is provisioned
    await services.budgets.admit(tenant, permit)  # 429 too, the permit given back
    relay.begin_turn()
    turn: RelayedTurn | None = None
    try:
        turn = RelayedTurn(services, await services.provisioner.ensure(session_id, tenant, known), permit, observed)
        yield turn
    finally:
        if turn is None or not turn.handed_over:
            try:
                await shielded(permit.release() if turn is not None and turn.counted else permit.refund())
            finally:
                relay.end_turn()
