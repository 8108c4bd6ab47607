"""A session as a whole: read it (``GET /sessions/{id}``) and delete it with its sandbox.

Both are the sandbox's own answers, relayed; the session's sandbox is started again if
the reaper removed it, since only the sandbox knows its conversation. A delete the
sandbox accepts (or that finds nothing there) also forgets the route, the sandbox and
the stored conversation (in tenant scope the session's seat on its shared volume: the
sandbox and volume go only with their last session).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from hosting.contract import SessionId
from hosting.gateway.http.dependencies import Services, Tenant
from hosting.gateway.http.exchange import owned_route, read_whole, relayed
from hosting.gateway.reaper import forget_session

logger = logging.getLogger("hosting.gateway")

router = APIRouter()


@router.get("/sessions/{session_id}")
async def get_session(session_id: SessionId, tenant: Tenant, services: Services, request: Request) -> Response:
    route = await services.provisioner.ensure(session_id, tenant, await owned_route(services, session_id, tenant))
    _, response, body = await read_whole(services, route, request, f"/sessions/{session_id}")
    return relayed(response, body)


@router.delete("/sessions/{session_id}")
async def delete_session(session_id: SessionId, tenant: Tenant, services: Services, request: Request) -> Response:
    route = await services.provisioner.ensure(session_id, tenant, await owned_route(services, session_id, tenant))
    route, response, body = await read_whole(services, route, request, f"/sessions/{session_id}")
    if response.status_code not in (204, 404):
        return relayed(response, body)
    await forget_session(services.backend, services.store, services.conversations, route, services.shared)
    logger.info("session %s: deleted with sandbox %s", session_id, route.sandbox_id)
    return Response(status_code=204)
