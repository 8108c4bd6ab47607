"""Asking a session's sandbox on behalf of a route: find the tenant's route, send, relay the answer.

Every route that reaches a sandbox does the same few things: look up the route of the
tenant's session (404 for an id it never used, exactly as for one nobody uses), send with
one replacement if the sandbox cannot be reached (the request never got there, so sending
it again is safe), and hand the client the sandbox's own answer.
"""

from __future__ import annotations

from fastapi import Request, Response

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_response import SandboxLost, SandboxResponse, SandboxUnreachable, SandboxUnresponsive
from hosting.gateway.services import GatewayServices


async def owned_route(services: GatewayServices, session_id: str, tenant: str) -> Route:
    """The route of the tenant's session, or 404."""
    route = await services.provisioner.route(session_id, tenant)
    if route is None:
        raise HostingError(f"no session {session_id!r}", code=ErrorCode.NOT_FOUND)
    return route


async def send(services: GatewayServices, route: Route, request: Request, path: str,
               body: bytes | None = None) -> tuple[Route, SandboxResponse]:
    """Send to the session's sandbox; if it cannot be reached, provision another once.
    Activity is stamped by the relay (off the request's critical path)."""
    relay = services.relay
    try:
        return route, await relay.send(route, request.method, path, request.headers, body)
    except SandboxUnreachable as exc:
        route = await services.provisioner.replace(route, unresponsive=isinstance(exc, SandboxUnresponsive))
        return route, await relay.send(route, request.method, path, request.headers, body)


async def read_whole(services: GatewayServices, route: Route, request: Request,
                     path: str) -> tuple[Route, SandboxResponse, bytes]:
    """A non-streaming exchange: the sandbox's status and body, read whole."""
    try:
        route, response = await send(services, route, request, path)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
    except (SandboxUnreachable, SandboxLost):
        raise HostingError("the session's sandbox stopped answering; retry", code=ErrorCode.SANDBOX_LOST) from None
    await services.relay.touch(route.key)
    return route, response, body


def relayed(response: SandboxResponse, body: bytes) -> Response:
    """The sandbox's answer, as the client gets it."""
    return Response(body, status_code=response.status_code, headers=response.relayed_headers())
