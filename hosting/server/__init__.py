"""The agent server: one per sandbox, speaking the HTTP/SSE contract.

``app`` builds the FastAPI app and runs it (``agent-server``, ``python -m
hosting.server``); ``sessions`` keeps each session's CLI and serialises its
turns; ``wire`` translates SDK messages into wire format v1; ``workspaces`` and
``durable`` keep conversations on disk and in a SessionStore; ``disk`` and
``retention`` keep the data volume within its budget (old sessions removed, local
copies of stored ones evicted, new sessions refused when full); ``box`` reads the memory
limit and CPU quota the server runs under and sizes its CLI pools to them.
"""
