"""The narrowest credential a sandbox can run a work item with.

A work item's ``secret`` (on the poll response only) is URL-safe base64 of a JSON
object whose ``sessions_token`` authorises that item's heartbeat, stop and session
calls, and nothing else. The SDK's worker prefers it over the environment key
(``EnvironmentWorker.handle_item(work_secret=...)``); the orchestrator hands a sandbox
that secret and refuses an item without a token rather than hand over the key. The
SDK's own decoder is private, so this mirrors it (same padding rule, same field).
"""

from __future__ import annotations

import base64
import binascii
import json


def sessions_token(secret: str | None) -> str | None:
    """The ``sessions_token`` inside a work item's ``secret``; ``None`` if it has none.
    Never log the secret or the token."""
    if not secret:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    except (ValueError, binascii.Error, TypeError):
        return None
    token = payload.get("sessions_token") if isinstance(payload, dict) else None
    return token if isinstance(token, str) and token else None
