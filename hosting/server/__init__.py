"""The agent server: one per sandbox, speaking the HTTP/SSE contract.

``app`` builds the FastAPI app and runs it (``agent-server``, ``python -m
hosting.server``); ``sessions`` runs each session's turns, one at a time, on CLIs
that ``live`` makes and starts, ``admission`` fits in the memory budget (and keeps warm
between turns) and ``prestart`` starts ahead for new sessions; ``wire`` translates SDK
messages into wire format v1; ``workspaces`` and ``durable`` keep conversations on disk
and in a SessionStore; ``disk`` and ``retention`` keep the data volume within its
budget (old sessions removed, local copies of stored ones evicted, new sessions refused
when full); ``box`` reads the memory limit and CPU quota the server runs under and sizes
its CLI pools to them.
"""
