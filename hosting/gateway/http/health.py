"""Liveness (``GET /health``: no auth, touches nothing) and readiness (``GET /ready``).

Ready means a turn could start now: the gateway is not draining and its routing store
answers. It asks for a tenant's or the admin's token; only the admin also sees the
backend, the pool and the streams in flight, which are the whole installation's: a
tenant learns nothing of the others' activity from it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from hosting.contract import RETRY_AFTER_SECONDS
from hosting.gateway.http.dependencies import Services, tenant_or_admin
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStoreUnavailable

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(services: Services, admin: Annotated[bool, Depends(tenant_or_admin)]) -> JSONResponse:
    relay, store = services.relay, services.store
    if not relay.accepting:
        return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_SECONDS})
    try:
        await store.ping()
    except RoutingStoreUnavailable:
        return JSONResponse({"ready": False, "reason": "routing store unreachable"}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_SECONDS})
    if not admin:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": True, "backend": services.backend.name, "running_streams": relay.running_streams,
                         "routing": "memory" if isinstance(store, MemoryRoutingStore) else "redis",
                         "pool": await services.pool.status()})
