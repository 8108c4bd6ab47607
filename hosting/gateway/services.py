"""Everything a gateway's routes use, built once from its settings and backend.

The routes, the lifespan and the draining server share one set of parts: the routing
store, the provisioner (and in tenant scope the shared sandboxes), quotas and budgets, the
warm pool, the reaper and retention, the relay, telemetry, the stored conversations and
the authenticator. They are wired
together here, once, so that each route module only takes what it needs from one typed
object (:class:`GatewayServices`) and nothing is built per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from hosting.gateway.budgets import Budgets, open_budget_ledger
from hosting.gateway.conversations import CredentialedBackend, StoredConversations
from hosting.gateway.pool import WARM_TIMEOUT_SECONDS, WarmPool
from hosting.gateway.pool_demand import PoolDemand
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.quotas import Quotas
from hosting.gateway.reaper import Reaper, SessionRetention
from hosting.gateway.relay import Relay
from hosting.gateway.routing import open_routing_store
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.settings import GatewaySettings
from hosting.gateway.telemetry import GatewayTelemetry, ObservedProvisioner
from hosting.gateway.tenant_scope import SharedSandboxes
from hosting.gateway.tenants import Authenticator, TokenAuthenticator
from hosting.sandboxes.base import SandboxBackend


@dataclass(frozen=True)
class GatewayServices:
    """The parts of one gateway process, wired together (:func:`build_services`)."""

    settings: GatewaySettings
    backend: SandboxBackend
    """The sandbox backend; with stored conversations, wrapped to hand each sandbox its store credential."""
    store: RoutingStore
    conversations: StoredConversations | None
    telemetry: GatewayTelemetry
    authenticator: Authenticator
    quotas: Quotas
    budgets: Budgets
    provisioner: Provisioner
    shared: SharedSandboxes | None
    """Tenant scope's shared sandboxes (``GATEWAY_SANDBOX_SCOPE=tenant``); ``None``: a sandbox per session."""
    pool: WarmPool
    reaper: Reaper
    retention: SessionRetention
    relay: Relay


def build_services(settings: GatewaySettings, backend: SandboxBackend, store: RoutingStore | None = None,
                   authenticator: Authenticator | None = None, budgets: Budgets | None = None) -> GatewayServices:
    """Wire a gateway's parts. ``store``, ``authenticator`` and ``budgets`` default to the settings'."""
    store = store or open_routing_store(settings.redis_url, settings.sandboxes.installation)
    conversations = (StoredConversations(settings.session_store_url, settings.sandboxes.installation)
                     if settings.session_store_url else None)
    if conversations is not None:
        backend = CredentialedBackend(backend, conversations)
    telemetry = GatewayTelemetry(settings.telemetry)
    authenticator = telemetry.authenticator(authenticator or TokenAuthenticator(settings.tenants))
    demand = PoolDemand(store, settings.warm_pool)
    quotas = Quotas(store, settings.tenant_limits, settings.tenant_overrides,
                    reservation_ttl_seconds=settings.provision_timeout_seconds + 10)
    budgets = budgets or Budgets(open_budget_ledger(store), settings.tenant_budget, settings.tenant_budget_overrides)
    relay = Relay(store, settings.sandboxes.installation,
                  stamp_interval_seconds=max(0.2, min(settings.idle_timeout_seconds / 4, 15.0)))
    shared = (SharedSandboxes(backend, store, relay, settings.sandbox_env, settings.sessions_per_sandbox,
                              settings.provision_timeout_seconds, conversations)
              if settings.sandbox_scope == "tenant" else None)
    session_capacity = settings.sessions_per_sandbox if shared is not None else 1
    provisioner = ObservedProvisioner(telemetry, backend, store, settings.sandbox_env, settings.provision_timeout_seconds,
                                      demand, quotas, shared)
    # The refill lock covers one wave of starts: each waits for its sandbox, then its CLI.
    pool = WarmPool(backend, store, provisioner, settings.sandbox_env, demand,
                    settings.provision_timeout_seconds + WARM_TIMEOUT_SECONDS + 10, session_capacity)
    telemetry.observe_running(lambda: relay.running_streams)
    return GatewayServices(
        settings=settings, backend=backend, store=store, conversations=conversations, telemetry=telemetry,
        authenticator=authenticator, quotas=quotas, budgets=budgets, provisioner=provisioner, shared=shared, pool=pool,
        reaper=Reaper(backend, store, settings.idle_timeout_seconds, shared),
        retention=SessionRetention(backend, store, conversations, settings.session_ttl_seconds, shared),
        relay=relay,
    )
