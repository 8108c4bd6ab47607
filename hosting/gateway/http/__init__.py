"""The gateway's HTTP routes, one router per concern.

``turns`` (send, re-attach, interrupt; the hot route), ``sessions`` (read, delete),
``runtime`` (Dari's advance), ``health`` (liveness, readiness), ``admin``. What they
share: ``dependencies`` (the services, the tenant, the admin), ``exchange`` (a session's
sandbox asked and answered), ``relayed_turn`` (a turn admitted, sent and given back),
``direct_route`` (the hot route's class). Not to be confused with ``gateway.routing``,
the routing store.
"""
