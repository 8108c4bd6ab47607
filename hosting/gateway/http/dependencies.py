"""What the gateway's routes depend on: its services, and who is asking (a tenant or the admin).

Each is ``async`` so that FastAPI runs it on the event loop rather than in a worker
thread (a thread hop per request). The services live on the app (:func:`services_of`),
so the routers are plain module-level :class:`fastapi.APIRouter` objects.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from hosting.contract import Unauthorized, bearer_token, tokens_equal
from hosting.errors import ErrorCode, HostingError
from hosting.gateway.services import GatewayServices


def services_of(request: Request) -> GatewayServices:
    """The services of the app serving ``request`` (:func:`hosting.gateway.app.create_app` sets them)."""
    services: GatewayServices = request.app.state.services
    return services


async def _services(request: Request) -> GatewayServices:
    return services_of(request)


Services = Annotated[GatewayServices, Depends(_services)]
"""The gateway's services, for a route."""


async def tenant_of(request: Request) -> str:
    """The authenticated tenant of a request, or 401."""
    tenant = services_of(request).authenticator.authenticate(request)
    if tenant is None:
        raise Unauthorized()
    return tenant


Tenant = Annotated[str, Depends(tenant_of)]
"""The authenticated tenant of a request (401 otherwise)."""


def _is_admin(request: Request) -> bool:
    admin_token = services_of(request).settings.admin_token
    token = bearer_token(request)
    return admin_token is not None and token is not None and tokens_equal(token, admin_token)


async def require_admin(request: Request) -> None:
    """404 while the admin API is off; 401 unless the request bears the admin token."""
    if services_of(request).settings.admin_token is None:
        raise HostingError("the admin API is off (set GATEWAY_ADMIN_TOKEN)", code=ErrorCode.NOT_FOUND)
    if not _is_admin(request):
        raise Unauthorized()


async def tenant_or_admin(request: Request) -> bool:
    """Any tenant, or the admin (401 otherwise); whether it is the admin."""
    if _is_admin(request):
        return True
    await tenant_of(request)
    return False
