"""Hosting for the research agent: one HTTP/SSE contract at every tier."""
