"""What every HTTP front of the product enforces, in one place.

The server and the gateway speak one contract (README, "The HTTP contract"), so
the rules a request must pass before anything is created live here and both
import them: the session-id rule, the body limit (declared or chunked), the
message body, JSON errors and bearer-token parsing. A request refused by these
rules never reaches a route, a sandbox or the model.

Every refusal is a :class:`~hosting.errors.HostingError`; :func:`error_response` is the
one place that turns one into an answer, and :func:`install_error_answers` makes it the
exception handler of a front (the server, the gateway, the environments webhook).
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hosting.errors import ErrorCode, HostingError, error_body

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_BODY_BYTES = 256 * 1024
RETRY_AFTER_SECONDS = str(ErrorCode.UNAVAILABLE.retry_after)
"""``Retry-After`` of a ``GET /ready`` that says "not ready" (a body of its own, not an error's)."""

EPOCH_HEADER = "x-agent-epoch"
"""Sent by the gateway with every request to a sandbox: the epoch of the session's
assignment to it (see ``hosting.stores.protocol.DurableSessionStore`` on fencing)."""
NAMESPACE_HEADER = "x-agent-namespace"
"""Sent by the gateway with every session request to a sandbox: ``<installation>/<tenant>``,
whose session ids the sandbox serves. Session ids are per tenant, so a stored
conversation is filed under the namespace too (:func:`durable_session_id`)."""
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}/[A-Za-z0-9._-]{1,128}")

STORE_PROJECT_KEY = "research-agent"
"""The one project key every stored conversation is filed under."""
_SESSION_NAMESPACE = uuid.UUID("6f6b1f9e-3c55-4a49-9d3e-7d2f3c1b9a10")


def durable_session_id(session_id: str, namespace: str | None = None) -> str:
    """The SDK session id a conversation is stored under, the same on every sandbox.

    A lone server (no namespace) files ``session_id`` as it is; behind a gateway the
    id is one tenant's, so the namespace (``<installation>/<tenant>``) is part of it:
    alice's ``trip-1`` and bob's ``trip-1`` are two stored conversations, whatever
    happens to the routes."""
    name = session_id if namespace is None else f"{namespace}/{session_id}"
    return str(uuid.uuid5(_SESSION_NAMESPACE, name))


class InvalidSessionId(ValueError):
    """The id does not match ``^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$``."""


def validate_session_id(session_id: str) -> str:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidSessionId(
            "session_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return session_id


async def _session_id(session_id: Annotated[str, Path()]) -> str:
    # async: FastAPI would run a plain function in a worker thread, a thread hop per request
    return path_session_id(session_id)


def path_session_id(session_id: str) -> str:
    """``session_id`` if it is valid; HTTP 400 otherwise."""
    try:
        return validate_session_id(session_id)
    except InvalidSessionId as exc:
        raise HostingError(str(exc), code=ErrorCode.BAD_REQUEST) from None


SessionId = Annotated[str, Depends(_session_id)]
"""A path parameter that is a valid session id (400 otherwise)."""

SESSION_ID_PARAMETER: dict[str, Any] = {"parameters": [
    {"name": "session_id", "in": "path", "required": True,
     "schema": {"type": "string", "pattern": f"^{SESSION_ID_PATTERN.pattern}$"}}]}
"""``openapi_extra`` of a route that reads its session id itself rather than as :data:`SessionId`."""


class MessageRequest(BaseModel):
    """Body of ``POST /sessions/{id}/messages``."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    include_raw: StrictBool = Field(default=False, description="Also stream the raw SDK messages (debugging).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


def jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without the non-JSON bits (exception objects in ``ctx``)."""
    return [{k: v for k, v in error.items() if k in ("type", "loc", "msg")} for error in errors]


async def message_body(request: Request) -> tuple[MessageRequest, bytes]:
    """Validate a message body: 415 not JSON, 400 malformed or not an object, 422 bad fields.

    Returns the parsed request and the raw bytes (the gateway forwards those unchanged).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HostingError("Content-Type must be application/json", code=ErrorCode.UNSUPPORTED_MEDIA_TYPE)
    raw = await request.body()
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HostingError(f"body is not valid JSON: {exc}", code=ErrorCode.BAD_REQUEST) from None
    if not isinstance(payload, dict):
        raise HostingError('body must be a JSON object like {"prompt": "..."}', code=ErrorCode.BAD_REQUEST)
    try:
        return MessageRequest.model_validate(payload), raw
    except ValidationError as exc:
        raise HostingError(jsonable_errors(exc.errors()), code=ErrorCode.INVALID_REQUEST) from None


def request_epoch(request: Request) -> int | None:
    """The request's :data:`EPOCH_HEADER` (``None`` without one: a client, not a gateway);
    HTTP 400 unless it is a positive integer that fits a 64-bit column."""
    raw = request.headers.get(EPOCH_HEADER)
    if raw is None:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 2**63:
        raise HostingError(f"{EPOCH_HEADER} must be a positive integer", code=ErrorCode.BAD_REQUEST)
    return int(raw)


def request_namespace(request: Request) -> str | None:
    """The request's :data:`NAMESPACE_HEADER` (``None`` without one); HTTP 400 if malformed."""
    raw = request.headers.get(NAMESPACE_HEADER)
    if raw is None:
        return None
    if not NAMESPACE_PATTERN.fullmatch(raw):
        raise HostingError(f"{NAMESPACE_HEADER} must be <installation>/<tenant>", code=ErrorCode.BAD_REQUEST)
    return raw


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing tells nothing about the token."""
    return hmac.compare_digest(given.encode(), expected.encode())


class Unauthorized(HostingError):
    """No bearer token, or not one this front accepts (401, with the challenge HTTP asks for)."""

    code = ErrorCode.UNAUTHORIZED

    def __init__(self, detail: str = "missing or invalid bearer token") -> None:
        super().__init__(detail)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


def no_turn_running(session_id: str) -> JSONResponse:
    """409 with ``"code": "no_turn_running"`` and no ``Retry-After``: told apart from the 409 of a
    turn already running (``session_busy``, ``Retry-After``), and still 409, which v1 clients
    (the chat page among them) read from an interrupt as "nothing to stop"."""
    return error_response(HostingError(f"no turn is running on session {session_id!r}",
                                       code=ErrorCode.NO_TURN_RUNNING))


def error_response(error: HostingError) -> JSONResponse:
    """The answer to ``error``: :func:`hosting.errors.error_body` with the code's status and
    the error's headers (``Retry-After`` when retrying can help)."""
    return JSONResponse(error_body(error.detail, error.code), status_code=error.code.status, headers=error.headers())


Observer = Callable[[HostingError], None]
"""Told of each error a front answers (its logs, its metrics); it changes nothing."""


def install_error_answers(app: FastAPI, max_body_bytes: int = MAX_BODY_BYTES, *, observe: Observer | None = None) -> None:
    """The body limit in front of ``app`` (413) and its JSON errors: every
    :class:`HostingError` through :func:`error_response` (``observe`` told first), and
    FastAPI's own validation errors as ``invalid_request``."""
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(HostingError)
    async def _answer(request: Request, exc: HostingError) -> JSONResponse:
        if observe is not None:
            observe(exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(HostingError(jsonable_errors(exc.errors()), code=ErrorCode.INVALID_REQUEST))


# Request body limit, enforced on every body, declared length or chunked.
# Starlette reads bodies lazily, so the limit sits in front of the app: the
# declared Content-Length is refused up front, a chunked body is counted as it
# streams in and refused the moment it passes the limit.


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Pure ASGI middleware answering 413 (``payload_too_large``) for oversized bodies,
    declared or counted as they arrive, before the app has read past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(send)
            else:  # the server reads no more than the declared length: nothing to count
                await self.app(scope, receive, send)
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not response_started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(f"request body larger than {self.max_bytes} bytes",
                                     ErrorCode.PAYLOAD_TOO_LARGE)).encode()
        await send({
            "type": "http.response.start",
            "status": ErrorCode.PAYLOAD_TOO_LARGE.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})
