"""The operator's view (``/admin/...``): a session's route, the sandboxes, a tenant's usage, the pool.

Behind the admin token only (:func:`require_admin`), and off (404) without one: it shows
every tenant's sessions and usage.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam

from hosting.contract import SessionId
from hosting.errors import ErrorCode, HostingError
from hosting.gateway.http.dependencies import Services, require_admin
from hosting.gateway.routing.records import route_key

TENANT_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
TenantName = Annotated[str, PathParam(pattern=TENANT_PATTERN)]

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.get("/sessions/{session_id}")
async def admin_session(session_id: SessionId, services: Services,
                        tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None) -> dict[str, Any]:
    """The session with this id: the only one, or ``tenant``'s (409 when several
    tenants use the id and none is named)."""
    store, backend = services.store, services.backend
    if tenant is not None:
        found = [route] if (route := await store.get(route_key(tenant, session_id))) is not None else []
    else:
        found = [route for route in await store.routes() if route.session_id == session_id]
    if not found:
        raise HostingError(f"no route for session {session_id!r}", code=ErrorCode.NOT_FOUND)
    if len(found) > 1:
        raise HostingError(f"{len(found)} tenants use session id {session_id!r}: "
                           f"choose one with ?tenant= ({', '.join(sorted(r.tenant for r in found))})",
                           code=ErrorCode.AMBIGUOUS_SESSION)
    route = found[0]
    described: dict[str, Any] = {
        "session_id": route.session_id, "tenant": route.tenant, "sandbox_id": route.sandbox_id,
        "backend": backend.name, "address": route.address, "state": route.state,
        "last_activity": route.last_activity, "volume": route.volume,
    }
    if backend.name == "local":
        described["pid"] = route.pid
    return described


@router.get("/sandboxes")
async def admin_sandboxes(services: Services) -> dict[str, Any]:
    backend = services.backend
    sandboxes = await backend.list()
    return {"backend": backend.name, "sandboxes": [
        {"sandbox_id": s.sandbox_id, "session_id": s.session_id, "tenant": s.tenant, "address": s.address,
         "volume": s.volume, "created_at": s.created_at, "pid": s.pid} for s in sandboxes]}


@router.get("/tenants/{tenant}")
async def admin_tenant(tenant: TenantName, services: Services) -> dict[str, Any]:
    return {**await services.quotas.usage(tenant), "budgets": await services.budgets.usage(tenant)}


@router.get("/pool")
async def admin_pool(services: Services) -> dict[str, Any]:
    return await services.pool.status()
