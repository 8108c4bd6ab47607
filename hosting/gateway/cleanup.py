"""Clean-up steps that finish even while their caller is being cancelled.

A client that leaves makes Starlette cancel the response's task, and with it every await
in its ``finally`` blocks; what an admitted turn or a claimed sandbox holds must still be
given back. The relayed stream, the turns, the budgets and the warm pool use this one helper.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import anyio

_cleanups: set[asyncio.Task[Any]] = set()


async def shielded(awaitable: Awaitable[Any]) -> None:
    """Run a clean-up step to its end even while the caller is being cancelled (a client
    that left: Starlette cancels the response's task, and would cancel every await in a
    ``finally`` too). If the caller is cancelled anyway, the step still completes."""
    task = asyncio.ensure_future(awaitable)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
    with anyio.CancelScope(shield=True):
        await asyncio.shield(task)
