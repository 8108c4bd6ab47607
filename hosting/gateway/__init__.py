"""Tier 3: the multi-tenant gateway in front of one sandbox per session (or, in tenant
scope, sandboxes each shared by a few sessions of one tenant).

``app`` (the app assembled, ``agent-gateway``), ``services`` (its parts, wired
once), ``lifecycle`` (start and stop), ``http`` (the routes, a router per concern),
``settings`` (the typed configuration), ``tenants`` (authentication), ``routing``
(the routing store: memory or Redis), ``provisioning`` (one sandbox per session,
under a lock), ``tenant_scope`` (a seat on a tenant's shared sandbox), ``quotas``
(per tenant: sandboxes, concurrent turns, turns per minute), ``budgets`` (per tenant
spend), ``pool`` (warm sandboxes; how many: ``pool_demand``, from the recent claims),
``reaper`` (idle sandboxes), ``reconcile`` (start-up), ``relay`` (SSE passed through;
with ``sandbox_response``, ``event_stream``, ``relayed_stream`` and ``cleanup``).
"""
