"""Observability shared by the server and the gateway: traces, metrics, logs (see README)."""
