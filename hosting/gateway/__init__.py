"""Tier 3: the multi-tenant gateway in front of one sandbox per session.

``app`` (routes, ``agent-gateway``), ``settings`` (the typed configuration),
``tenants`` (authentication), ``routing`` (the routing store: memory or Redis),
``provisioning`` (one sandbox per session, under a lock), ``quotas`` (per
tenant: sandboxes, concurrent turns, turns per minute), ``pool`` (warm
sandboxes), ``reaper`` (idle sandboxes), ``reconcile`` (start-up),
``relay`` (SSE passed through).
"""
