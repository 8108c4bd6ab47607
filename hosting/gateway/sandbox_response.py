"""A sandbox's answer as the gateway relays it, and the ways asking a sandbox fails.

The relay's HTTP client (:mod:`hosting.gateway.sandbox_http`) speaks in connections; the
routes speak in answers to relay and in failures that decide what happens next: a request
that never reached its sandbox may be sent to a new one, a request that may have run may
not. This module is that translation, and the headers a client gets back.
"""

from __future__ import annotations

from collections.abc import Mapping

from hosting.gateway.sandbox_http import ConnectionBroken, SandboxAnswer

RELAYED_RESPONSE_HEADERS = ("content-type", "cache-control", "retry-after", "x-accel-buffering")


class SandboxUnreachable(Exception):
    """No connection could be made: the request never reached the sandbox, so it is
    safe to provision another and send it again."""


class SandboxUnresponsive(SandboxUnreachable):
    """Connected, but neither the request nor ``/health`` got an answer (a stopped or
    partitioned sandbox). Replaced like an unreachable one; if it wakes up it may still
    run the request, but its writes to the session store are fenced off (see
    :data:`hosting.contract.EPOCH_HEADER`) once the new sandbox took over."""


class SandboxLost(Exception):
    """The connection broke after the request was sent: it may have run."""


class SandboxResponse:
    """A sandbox's answer, open for streaming: its status, headers and bytes, as relayed.
    Its body reads whatever has arrived, so events that came together are relayed in one
    write."""

    def __init__(self, answer: SandboxAnswer) -> None:
        self._answer = answer
        self.status_code = answer.status
        self.headers: Mapping[str, str] = answer.headers

    async def aread(self) -> bytes:
        try:
            return await self._answer.read()
        except ConnectionBroken as exc:
            raise SandboxLost(str(exc)) from None
        finally:
            self._answer.release()

    async def read_any(self) -> bytes:
        """Whatever has arrived (waiting for something); ``b""`` at the end of the body."""
        try:
            return await self._answer.read_any()
        except ConnectionBroken as exc:
            raise SandboxLost(str(exc)) from None

    async def aclose(self) -> None:
        """Let the connection go: reused if the body was read to its end, else closed."""
        self._answer.release()

    def relayed_headers(self) -> dict[str, str]:
        """The headers a client gets from the sandbox's answer (:data:`RELAYED_RESPONSE_HEADERS`)."""
        return {name: self.headers[name] for name in RELAYED_RESPONSE_HEADERS if name in self.headers}
