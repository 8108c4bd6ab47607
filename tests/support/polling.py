"""Waiting for a condition by polling it, instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30, interval: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


async def wait_for_async(predicate: Callable[[], T | Awaitable[T]], timeout: float = 30, interval: float = 0.01) -> T:
    """:func:`wait_for` on an event loop: ``predicate`` may be a coroutine function, and the
    loop runs the code under test between two polls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
