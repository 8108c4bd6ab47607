"""The product's one error model: every error code, its HTTP status, whether to retry.

A refusal (an HTTP answer) and a failed turn (an ``error`` wire event) speak the same
codes, so a client, a dashboard and Dari's runtime read one table instead of three
that drift apart. :class:`ErrorCode` is that table; :class:`HostingError` is what code
raises to be answered with it (:func:`hosting.contract.install_error_answers` turns it
into ``{"detail": ..., "code": ...}`` with the code's status and ``Retry-After``).

Wire codes are API: a member's string never changes once shipped. This module imports
nothing of the product, of FastAPI or of the agent SDK, so the client can use it too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

RETRY_SOON_SECONDS = 2
"""When to try again after a refusal that clears by itself soon (a busy session, a
draining front, a store outage)."""
RETRY_STORAGE_SECONDS = 30
"""When to try again after 507: room on a full disk comes back slower than a busy session."""


class ErrorCode(StrEnum):
    """An error as the wire says it: the member's value is the ``code`` string, with the
    HTTP status it is answered with and the ``Retry-After`` seconds that make it
    retryable (``None``: retrying the same request cannot help).

    Where several codes share a status, the first declared is the general one that a
    refusal known only by its status stands for (:meth:`for_status`)."""

    status: int
    retry_after: int | None

    def __new__(cls, wire: str, status: int, retry_after: int | None) -> ErrorCode:
        member = str.__new__(cls, wire)
        member._value_ = wire
        member.status = status
        member.retry_after = retry_after
        return member

    # The request itself is wrong: the same request fails again.
    BAD_REQUEST = ("bad_request", 400, None)
    UNAUTHORIZED = ("unauthorized", 401, None)
    FORBIDDEN = ("forbidden", 403, None)
    """Never answered by the product's fronts (another tenant's session is simply not found);
    whatever stands in front of them (an IAM proxy) may."""
    NOT_FOUND = ("not_found", 404, None)
    REQUEST_TIMEOUT = ("request_timeout", 408, None)
    """The request's head did not arrive in time; the connection is closed."""
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, None)
    HEADERS_TOO_LARGE = ("headers_too_large", 431, None)
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, None)
    MISDIRECTED = ("misdirected", 421, None)
    """A server on loopback asked for another host name, or a sandbox for another tenant."""
    INVALID_REQUEST = ("invalid_request", 422, None)

    # The session's state: a turn runs, none runs, or what was asked for is gone.
    SESSION_BUSY = ("session_busy", 409, RETRY_SOON_SECONDS)
    NO_TURN_RUNNING = ("no_turn_running", 409, None)
    INTERRUPTED = ("interrupted", 409, RETRY_SOON_SECONDS)
    """The turn was stopped (``POST /sessions/{id}/interrupt``); as an answer, Dari's advance."""
    AMBIGUOUS_SESSION = ("ambiguous_session", 409, None)
    """The admin API: several tenants use the session id and none was named."""
    SESSION_GONE = ("session_gone", 410, None)
    """A conversation that cannot be resumed (Dari's state names one nobody holds)."""
    EVENTS_GONE = ("events_gone", 410, None)
    """A re-attach asked for events that were no longer kept."""

    # The tenant's limits (the gateway).
    OVER_QUOTA = ("over_quota", 429, RETRY_SOON_SECONDS)
    """A tenant quota is reached; the refusal names its own ``Retry-After``."""
    OVER_BUDGET = ("over_budget", 429, RETRY_SOON_SECONDS)
    """A tenant budget is spent; the refusal names when its window ends."""

    # The front cannot take it now: retry shortly (elsewhere, for a draining replica).
    UNAVAILABLE = ("unavailable", 503, RETRY_SOON_SECONDS)
    SHUTTING_DOWN = ("shutting_down", 503, RETRY_SOON_SECONDS)
    AT_CAPACITY = ("at_capacity", 503, RETRY_SOON_SECONDS)
    """No CLI could be started within the server's memory budget in time."""
    STORE_UNAVAILABLE = ("store_unavailable", 503, RETRY_SOON_SECONDS)
    NO_SANDBOX = ("no_sandbox", 503, RETRY_SOON_SECONDS)
    """The gateway could not start a sandbox for the session."""
    SANDBOX_LOST = ("sandbox_lost", 503, RETRY_SOON_SECONDS)
    SUPERSEDED = ("superseded", 503, RETRY_SOON_SECONDS)
    """The session moved to another sandbox (a newer epoch fenced this one off)."""
    STORAGE_FULL = ("storage_full", 507, RETRY_STORAGE_SECONDS)

    # The model or the agent failed the turn (as an answer, Dari's advance: 502 unless said).
    AGENT_ERROR = ("agent_error", 502, RETRY_SOON_SECONDS)
    """Also a model API error that retrying cannot help, sent with ``retryable: false``."""
    MODEL_UNAVAILABLE = ("model_unavailable", 502, RETRY_SOON_SECONDS)
    MODEL_AUTH_FAILED = ("model_auth_failed", 502, None)
    RATE_LIMITED = ("rate_limited", 429, RETRY_SOON_SECONDS)
    OVERLOADED = ("overloaded", 503, RETRY_SOON_SECONDS)

    @property
    def retryable(self) -> bool:
        return self.retry_after is not None

    @classmethod
    def from_wire(cls, code: object) -> ErrorCode | None:
        """The member whose wire string is ``code``; ``None`` for anything else (a newer
        peer's code: a reader of the wire must not break on one)."""
        return next((member for member in cls if member.value == code), None)

    @classmethod
    def for_status(cls, status: int) -> ErrorCode | None:
        """The general code of ``status`` (the first declared with it); ``None`` if none has it."""
        return next((code for code in cls if code.status == status), None)


class HostingError(Exception):
    """An error that becomes an answer: ``code`` says which, :attr:`detail` what the
    answer's ``detail`` says, :attr:`retry_after` its ``Retry-After`` (the code's, unless
    the error knows better, as a quota does).

    A subclass names its code; a one-off refusal passes it: ``HostingError("no session
    'x'", code=ErrorCode.NOT_FOUND)``."""

    code: ErrorCode

    def __init__(self, detail: Any, *, code: ErrorCode | None = None) -> None:
        super().__init__(detail)
        if code is not None:
            self.code = code
        self.retry_after: int | None = self.code.retry_after

    @property
    def detail(self) -> Any:
        """What the answer's ``detail`` says (JSON): by default what the error was raised with."""
        return self.args[0]

    def headers(self) -> dict[str, str]:
        """The answer's headers: ``Retry-After`` when retrying can help."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def error_body(detail: str, code: ErrorCode) -> dict[str, str]:
    """The body of every error answer: ``code`` is additive, so a v1 client, which reads
    only ``detail``, sees what it always saw."""
    return {"detail": detail, "code": code.value}


class StoreUnavailable(HostingError, ConnectionError):
    """A store the request needs cannot be reached; nothing was changed (503, retry).

    Raised with what the driver said, which goes to the logs; the answer names only the
    store (``session store`` here; a subclass names its own with ``store=``, as the
    gateway's routing store does)."""

    code = ErrorCode.STORE_UNAVAILABLE
    store: ClassVar[str] = "session store"

    def __init_subclass__(cls, *, store: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if store is not None:
            cls.store = store

    @property
    def detail(self) -> str:
        return f"the {self.store} is unavailable; nothing was changed"
