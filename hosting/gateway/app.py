"""The gateway: one authenticated front door, a sandbox per session behind it.

Same routes and errors as the server (:mod:`hosting.contract` enforces both).
The gateway authenticates the tenant, finds or provisions the sandbox of that
tenant's session and relays. Session ids are per tenant: alice's ``trip-1`` and
bob's ``trip-1`` are two sessions, and an id a tenant never used answers exactly
as one nobody uses; it never runs a turn or
interprets one. Requests the contract refuses are refused here, before any
route or sandbox exists; so are turns over a tenant quota or budget (429, see
:mod:`hosting.gateway.quotas` and :mod:`hosting.gateway.budgets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from hosting.contract import (
    RETRY_AFTER_SECONDS,
    SESSION_ID_PARAMETER,
    Observer,
    SessionId,
    Unauthorized,
    bearer_token,
    install_error_answers,
    message_body,
    no_turn_running,
    path_session_id,
    tokens_equal,
)
from hosting.draining import DrainingServer
from hosting.errors import ErrorCode, HostingError
from hosting.gateway.budgets import BudgetExhausted, Budgets, open_budget_ledger
from hosting.gateway.cleanup import shielded
from hosting.gateway.conversations import CredentialedBackend, StoredConversations
from hosting.gateway.event_stream import lost_stream
from hosting.gateway.pool import WarmPool
from hosting.gateway.provisioning import ProvisioningFailed
from hosting.gateway.quotas import QuotaExceeded, Quotas
from hosting.gateway.reaper import Reaper, SessionRetention, forget_session
from hosting.gateway.reconcile import adopt_legacy_routes, reconcile
from hosting.gateway.relay import Relay
from hosting.gateway.relayed_stream import RelayedStream
from hosting.gateway.routing import open_routing_store
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStore, RoutingStoreUnavailable
from hosting.gateway.routing.records import Route, route_key
from hosting.gateway.runtime import install_runtime
from hosting.gateway.sandbox_response import SandboxLost, SandboxResponse, SandboxUnreachable
from hosting.gateway.settings import GatewaySettings
from hosting.gateway.telemetry import GatewayTelemetry, GatewayTurn, ObservedProvisioner
from hosting.gateway.tenants import Authenticator, TokenAuthenticator
from hosting.sandboxes.base import SandboxBackend, SandboxError
from hosting.sandboxes.settings import open_backend
from hosting.settings_env import ConfigError
from hosting.telemetry.http import FASTAPI_TELEMETRY
from hosting.telemetry.logs import configure_logging
from hosting.web import mount_chat_page

logger = logging.getLogger("hosting.gateway")

TENANT_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
TenantName = Annotated[str, PathParam(pattern=TENANT_PATTERN)]


def _refusals_noted(telemetry: GatewayTelemetry) -> Observer:
    """What the gateway logs and counts of the refusals it answers (the answers are the contract's)."""

    def note(refusal: HostingError) -> None:
        if isinstance(refusal, RoutingStoreUnavailable):
            logger.warning("%s", refusal)
            telemetry.store_failures.add(1)
        elif isinstance(refusal, ProvisioningFailed):
            logger.error("provisioning failed: %s", refusal)
        elif isinstance(refusal, (QuotaExceeded, BudgetExhausted)):
            logger.info("refused: %s", refusal.detail)

    return note


def _relayed(response: SandboxResponse, body: bytes) -> Response:
    return Response(body, status_code=response.status_code, headers=response.relayed_headers())


async def _tenant_of(request: Request) -> str:
    # async, so FastAPI runs it on the loop instead of a worker thread (a thread hop per request)
    tenant: str | None = request.app.state.authenticator.authenticate(request)
    if tenant is None:
        raise Unauthorized()
    return tenant


Tenant = Annotated[str, Depends(_tenant_of)]
"""The authenticated tenant of a request (401 otherwise)."""


class DirectRoute(APIRoute):
    """A route whose endpoint takes the :class:`Request` and returns the :class:`Response`
    itself. It is documented like any route (OpenAPI, from its signature and
    ``openapi_extra``) and errors reach the app's exception handlers as usual; only
    FastAPI's per-request handler is left out (parameter resolution, response
    serialisation), which such an endpoint does not use. FastAPI's documented hook for
    custom routes (``get_route_handler``). For the relayed turn: its latency through the
    gateway fell by 0.2-0.3 ms (bench/README.md, the relay)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)


def _is_admin(request: Request) -> bool:
    admin_token: str | None = request.app.state.settings.admin_token
    token = bearer_token(request)
    return admin_token is not None and token is not None and tokens_equal(token, admin_token)


async def _require_admin(request: Request) -> None:
    if request.app.state.settings.admin_token is None:
        raise HostingError("the admin API is off (set GATEWAY_ADMIN_TOKEN)", code=ErrorCode.NOT_FOUND)
    if not _is_admin(request):
        raise Unauthorized()


async def _tenant_or_admin(request: Request) -> None:
    if not _is_admin(request):
        await _tenant_of(request)


def create_app(settings: GatewaySettings, backend: SandboxBackend, store: RoutingStore | None = None,
               authenticator: Authenticator | None = None, budgets: Budgets | None = None) -> FastAPI:
    """Build the gateway. ``store``, ``authenticator`` and ``budgets`` default to the settings'."""
    store = store or open_routing_store(settings.redis_url, settings.sandboxes.installation)
    conversations = (StoredConversations(settings.session_store_url, settings.sandboxes.installation)
                     if settings.session_store_url else None)
    if conversations is not None:
        backend = CredentialedBackend(backend, conversations)
    telemetry = GatewayTelemetry(settings.telemetry)
    authenticator = telemetry.authenticator(authenticator or TokenAuthenticator(settings.tenants))
    claimed = asyncio.Event()
    quotas = Quotas(store, settings.tenant_limits, settings.tenant_overrides,
                    reservation_ttl_seconds=settings.provision_timeout_seconds + 10)
    budgets = budgets or Budgets(open_budget_ledger(store), settings.tenant_budget, settings.tenant_budget_overrides)
    provisioner = ObservedProvisioner(telemetry, backend, store, settings.sandbox_env, settings.provision_timeout_seconds,
                                      claimed, quotas)
    pool = WarmPool(backend, store, provisioner, settings.sandbox_env, settings.warm_pool,
                    settings.provision_timeout_seconds + 10, claimed)
    reaper = Reaper(backend, store, settings.idle_timeout_seconds)
    retention = SessionRetention(backend, store, conversations, settings.session_ttl_seconds)
    relay = Relay(store, settings.sandboxes.installation,
                  stamp_interval_seconds=max(0.2, min(settings.idle_timeout_seconds / 4, 15.0)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if isinstance(backend, CredentialedBackend):
                await backend.prepare()
            await adopt_legacy_routes(backend, store, conversations)
            await reconcile(backend, store)
            if isinstance(backend, CredentialedBackend):
                await backend.remove_orphan_credentials()
        except (RoutingStoreUnavailable, SandboxError, ConnectionError) as exc:
            logger.warning("could not reconcile sandboxes at start-up: %s", exc)
        tasks = [asyncio.create_task(pool.run(), name="warm-pool"), asyncio.create_task(reaper.run(), name="reaper"),
                 asyncio.create_task(retention.run(), name="retention")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if isinstance(store, MemoryRoutingStore):
                await _remove_everything(backend, store, pool)
            await relay.aclose()
            await budgets.drain()
            await store.aclose()
            await backend.aclose()
            if conversations is not None:
                await conversations.aclose()
            telemetry.shutdown()

    # No /docs or /redoc: FastAPI's load scripts from a CDN on the chat page's origin (hosting/server/api_docs.py).
    app = FastAPI(title="Research agent gateway", version="1", lifespan=lifespan, telemetry=FASTAPI_TELEMETRY,
                  docs_url=None, redoc_url=None)

    async def post_message(request: Request) -> Response:
        session_id = path_session_id(request.path_params["session_id"])
        tenant = await _tenant_of(request)
        _, raw = await message_body(request)
        with telemetry.turn(tenant) as observed:
            return await relay_turn(session_id, tenant, request, raw, observed)

    # The hot route, matched first and served as a DirectRoute (it reads its parameters itself).
    app.router.add_api_route("/sessions/{session_id}/messages", post_message, methods=["POST"],
                             openapi_extra=SESSION_ID_PARAMETER, route_class_override=DirectRoute)

    async def relay_turn(session_id: str, tenant: str, request: Request, raw: bytes, observed: GatewayTurn) -> Response:
        if not relay.accepting:
            raise HostingError("the gateway is shutting down; retry on another replica", code=ErrorCode.SHUTTING_DOWN)
        known = await provisioner.route(session_id, tenant)  # 503 before anything is counted
        permit = await quotas.admit_turn(tenant)  # 429 before anything is provisioned
        await budgets.admit(tenant, permit)  # 429 too, the permit given back
        relay.begin_turn()
        streaming = False
        try:
            route = await provisioner.ensure(session_id, tenant, known)
            path = f"/sessions/{session_id}/messages"
            try:
                with observed.relaying():
                    route, response = await send(route, request, path, raw)
            except (SandboxUnreachable, SandboxLost) as exc:
                logger.warning("session %s: sandbox lost before the turn started: %s", session_id, exc)
                observed.lost()
                return StreamingResponse(iter([lost_stream(None, "the session's sandbox could not take the turn; "
                                                                 "send it again")]), media_type="text/event-stream")
            if response.status_code != 200:  # refused by the sandbox (409, 422, ...): not counted
                observed.refused_by_sandbox(response.status_code)
                try:
                    return _relayed(response, await response.aread())
                finally:
                    await response.aclose()

            async def finished() -> None:
                try:
                    await permit.release()
                finally:
                    relay.end_turn()
                    observed.finish()

            charge = budgets.charge(tenant, session_id)
            observed.on_result = charge.result  # the turn's spend is counted as its result is relayed

            async def turn_over() -> None:  # before done goes out: the next turn finds the slot free, the spend counted
                try:
                    await permit.release()
                finally:
                    await charge.settled()

            streaming = observed.streaming = True
            return RelayedStream(relay.stream(route, response, on_end=turn_over, observer=observed.saw),
                                 response.relayed_headers(),
                                 on_close=finished,
                                 while_open=permit.keep_alive if permit.holds_slot else None)
        finally:
            if not streaming:
                try:
                    await shielded(permit.refund())
                finally:
                    relay.end_turn()

    install_error_answers(app, settings.max_body_bytes, observe=_refusals_noted(telemetry))
    mount_chat_page(app)
    app.state.settings, app.state.authenticator = settings, authenticator
    app.state.store, app.state.pool, app.state.reaper, app.state.relay = store, pool, reaper, relay
    app.state.retention = retention
    app.state.quotas, app.state.budgets = quotas, budgets
    telemetry.install(app, [settings.admin_token, settings.telemetry.metrics_token], pool)
    telemetry.observe_running(lambda: relay.running_streams)

    async def owned_route(session_id: str, tenant: str) -> Route:
        route = await provisioner.route(session_id, tenant)
        if route is None:
            raise HostingError(f"no session {session_id!r}", code=ErrorCode.NOT_FOUND)
        return route

    async def send(route: Route, request: Request, path: str, body: bytes | None = None) -> tuple[Route, SandboxResponse]:
        """Send to the session's sandbox; if it cannot be reached, provision another once.
        Activity is stamped by the relay (off the request's critical path)."""
        try:
            return route, await relay.send(route, request.method, path, request.headers, body)
        except SandboxUnreachable:
            route = await provisioner.replace(route)
            return route, await relay.send(route, request.method, path, request.headers, body)

    async def plain(route: Route, request: Request, path: str) -> tuple[Route, SandboxResponse, bytes]:
        """A non-streaming exchange: the sandbox's status and body, read whole."""
        try:
            route, response = await send(route, request, path)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except (SandboxUnreachable, SandboxLost):
            raise HostingError("the session's sandbox stopped answering; retry", code=ErrorCode.SANDBOX_LOST) from None
        await relay.touch(route.key)
        return route, response, body

    install_runtime(app, tenant_of=_tenant_of, provisioner=provisioner, quotas=quotas, budgets=budgets, relay=relay,
                    send=send, telemetry=telemetry)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", dependencies=[Depends(_tenant_or_admin)])
    async def ready() -> JSONResponse:
        if not relay.accepting:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_SECONDS})
        try:
            await store.ping()
        except RoutingStoreUnavailable:
            return JSONResponse({"ready": False, "reason": "routing store unreachable"}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_SECONDS})
        return JSONResponse({"ready": True, "backend": backend.name, "running_streams": relay.running_streams,
                             "routing": "memory" if isinstance(store, MemoryRoutingStore) else "redis",
                             "pool": await pool.status()})

    @app.get("/sessions/{session_id}/events")
    async def reattach(session_id: SessionId, tenant: Tenant, request: Request) -> Response:
        """Relay a re-attach to the session's sandbox. Never provisions: a new sandbox
        has no turn to re-attach to."""
        route = await owned_route(session_id, tenant)
        gone = HostingError(f"no turn of session {session_id!r} to re-attach to (its sandbox is gone)",
                            code=ErrorCode.NOT_FOUND)
        if route.sandbox_id is None:
            raise gone
        path = f"/sessions/{session_id}/events"
        if request.url.query:
            path = f"{path}?{request.url.query}"
        try:
            response = await relay.send(route, "GET", path, request.headers)
        except (SandboxUnreachable, SandboxLost):
            raise gone from None
        if response.status_code != 200:
            try:
                return _relayed(response, await response.aread())
            finally:
                await response.aclose()
        return RelayedStream(relay.stream(route, response), response.relayed_headers())

    @app.post("/sessions/{session_id}/interrupt")
    async def interrupt(session_id: SessionId, tenant: Tenant, request: Request) -> Response:
        route = await owned_route(session_id, tenant)
        if route.sandbox_id is None:
            return no_turn_running(session_id)
        try:
            response = await relay.send(route, "POST", f"/sessions/{session_id}/interrupt", request.headers)
            body = await response.aread()
            await response.aclose()
        except (SandboxUnreachable, SandboxLost):
            return no_turn_running(session_id)  # a sandbox that is gone runs no turn
        return _relayed(response, body)  # the sandbox's own answer: 200, or 409 no_turn_running

    @app.get("/sessions/{session_id}")
    async def get_session(session_id: SessionId, tenant: Tenant, request: Request) -> Response:
        route = await provisioner.ensure(session_id, tenant, await owned_route(session_id, tenant))
        _, response, body = await plain(route, request, f"/sessions/{session_id}")
        return _relayed(response, body)

    @app.delete("/sessions/{session_id}")
    async def delete_session(session_id: SessionId, tenant: Tenant, request: Request) -> Response:
        route = await provisioner.ensure(session_id, tenant, await owned_route(session_id, tenant))
        route, response, body = await plain(route, request, f"/sessions/{session_id}")
        if response.status_code not in (204, 404):
            return _relayed(response, body)
        await forget_session(backend, store, conversations, route)
        logger.info("session %s: deleted with sandbox %s", session_id, route.sandbox_id)
        return Response(status_code=204)

    @app.get("/admin/sessions/{session_id}", dependencies=[Depends(_require_admin)])
    async def admin_session(session_id: SessionId,
                            tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None) -> dict[str, Any]:
        """The session with this id: the only one, or ``tenant``'s (409 when several
        tenants use the id and none is named)."""
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

    @app.get("/admin/sandboxes", dependencies=[Depends(_require_admin)])
    async def admin_sandboxes() -> dict[str, Any]:
        sandboxes = await backend.list()
        return {"backend": backend.name, "sandboxes": [
            {"sandbox_id": s.sandbox_id, "session_id": s.session_id, "tenant": s.tenant, "address": s.address,
             "volume": s.volume, "created_at": s.created_at, "pid": s.pid} for s in sandboxes]}

    @app.get("/admin/tenants/{tenant}", dependencies=[Depends(_require_admin)])
    async def admin_tenant(tenant: TenantName) -> dict[str, Any]:
        return {**await quotas.usage(tenant), "budgets": await budgets.usage(tenant)}

    @app.get("/admin/pool", dependencies=[Depends(_require_admin)])
    async def admin_pool() -> dict[str, Any]:
        return await pool.status()

    return app


async def _remove_everything(backend: SandboxBackend, store: RoutingStore, pool: WarmPool) -> None:
    """With an in-memory store nothing could find these sandboxes again: remove them.
    Session volumes stay on disk (a restarted gateway does not know them either)."""
    await pool.drain()
    for route in await store.routes():
        if route.sandbox_id is not None:
            with contextlib.suppress(SandboxError):
                await backend.delete(route.sandbox_id)


def main() -> None:
    """``agent-gateway`` / ``python -m hosting.gateway``."""
    try:
        settings = GatewaySettings.from_env()
        configure_logging(settings.telemetry.log_format)
        settings.sandboxes.data_dir.mkdir(parents=True, exist_ok=True)
        backend = open_backend(settings.sandboxes)
    except (ConfigError, SandboxError, OSError) as exc:
        print(f"agent-gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    app = create_app(settings, backend)
    DrainingServer(app, settings.host, settings.port, app.state.relay, settings.shutdown_grace_seconds,
                   settings.http).run()
