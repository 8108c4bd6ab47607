"""A route class for the relayed turn, the gateway's hot path: FastAPI's per-request handler left out."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, cast

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DirectRoute(APIRoute):
    """A route whose endpoint takes the :class:`Request` and returns the :class:`Response`
    itself. It is documented like any route (OpenAPI, from its signature and
    ``openapi_extra``) and errors reach the app's exception handlers as usual; only
    FastAPI's per-request handler is left out (parameter resolution, response
    serialisation), which such an endpoint does not use. FastAPI's documented hook for
    custom routes (``get_route_handler``). For the relayed turn: its latency through the
    gateway fell by 0.2-0.3 ms (bench/README.md, the relay)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)
