"""The gateway: one authenticated front door, a sandbox per session behind it (or per
few sessions of one tenant: ``GATEWAY_SANDBOX_SCOPE=tenant``).

Same routes and errors as the server (:mod:`hosting.contract` enforces both).
The gateway authenticates the tenant, finds or provisions the sandbox of that
tenant's session and relays. Session ids are per tenant: alice's ``trip-1`` and
bob's ``trip-1`` are two sessions, and an id a tenant never used answers exactly
as one nobody uses; it never runs a turn or
interprets one. Requests the contract refuses are refused here, before any
route or sandbox exists; so are turns over a tenant quota or budget (429, see
:mod:`hosting.gateway.quotas` and :mod:`hosting.gateway.budgets`).

This module assembles the app: its services (:mod:`hosting.gateway.services`), its
lifespan (:mod:`hosting.gateway.lifecycle`) and its routes (:mod:`hosting.gateway.http`).
"""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

from hosting.contract import Observer, install_error_answers
from hosting.draining import DrainingServer
from hosting.errors import HostingError
from hosting.gateway.budgets import BudgetExhausted, Budgets
from hosting.gateway.http import admin, health, runtime, sessions, turns
from hosting.gateway.lifecycle import running
from hosting.gateway.provisioning import ProvisioningFailed
from hosting.gateway.quotas import QuotaExceeded
from hosting.gateway.routing.protocols import RoutingStore, RoutingStoreUnavailable
from hosting.gateway.services import build_services
from hosting.gateway.settings import GatewaySettings
from hosting.gateway.telemetry import GatewayTelemetry
from hosting.gateway.tenants import Authenticator
from hosting.sandboxes.base import SandboxBackend, SandboxError
from hosting.sandboxes.settings import open_backend
from hosting.settings_env import ConfigError
from hosting.telemetry.http import FASTAPI_TELEMETRY
from hosting.telemetry.logs import configure_logging
from hosting.web import mount_chat_page

logger = logging.getLogger("hosting.gateway")


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


def create_app(settings: GatewaySettings, backend: SandboxBackend, store: RoutingStore | None = None,
               authenticator: Authenticator | None = None, budgets: Budgets | None = None) -> FastAPI:
    """Build the gateway. ``store``, ``authenticator`` and ``budgets`` default to the settings'."""
    services = build_services(settings, backend, store, authenticator, budgets)
    # No /docs or /redoc: FastAPI's load scripts from a CDN on the chat page's origin (hosting/server/api_docs.py).
    app = FastAPI(title="Research agent gateway", version="1", lifespan=lambda _: running(services),
                  telemetry=FASTAPI_TELEMETRY, docs_url=None, redoc_url=None)
    app.state.services = services
    turns.add_message_route(app)
    install_error_answers(app, settings.max_body_bytes, observe=_refusals_noted(services.telemetry))
    mount_chat_page(app)
    services.telemetry.install(app, [settings.admin_token, settings.telemetry.metrics_token], services.pool)
    for router in (runtime.router, health.router, turns.router, sessions.router, admin.router):
        app.include_router(router)
    return app


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
    relay = app.state.services.relay
    DrainingServer(app, settings.host, settings.port, relay, settings.shutdown_grace_seconds, settings.http,
                   stop_work=relay.cut_streams).run()
