"""Who is calling: tenant authentication.

An :class:`Authenticator` turns a request into a tenant name, or refuses it.
The gateway ships :class:`TokenAuthenticator` (static bearer tokens, stored as
SHA-256 digests). To use JWT/OIDC instead, implement ``authenticate`` — verify
the bearer token's signature, issuer, audience and expiry with a JOSE library
(e.g. PyJWT with the issuer's JWKS) and return the claim that names the tenant
— and pass it to :func:`hosting.gateway.app.create_app`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from starlette.requests import Request

from hosting.contract import bearer_token
from hosting.settings_env import ConfigError

TenantTokens = Mapping[bytes, str]
"""SHA-256 digest of a token → tenant name."""


class Authenticator(Protocol):
    """Maps a request to the tenant it acts for."""

    def authenticate(self, request: Request) -> str | None:
        """The tenant, or ``None`` to answer 401. Must not raise for bad input. Called on the
        event loop for every request: it must not block (verify a JWT against keys fetched
        in the background, not per call)."""
        ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Static bearer tokens. Every configured digest is compared in constant time,
    so neither the answer's timing nor its content tells which tokens exist."""

    def __init__(self, tokens: TenantTokens) -> None:
        self._tokens = list(tokens.items())

    def authenticate(self, request: Request) -> str | None:
        token = bearer_token(request)
        if token is None:
            return None
        given = _digest(token)
        tenant = None
        for digest, name in self._tokens:
            if hmac.compare_digest(given, digest):
                tenant = name
        return tenant


def _tenant_name(name: str, where: str) -> str:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: tenant names are letters, digits, '-', '_' and '.', got {name!r}")
    return name


LIMIT_NAMES = ("max_sandboxes", "max_turns", "turns_per_minute")
"""Per-tenant quota overrides a ``GATEWAY_TENANTS_FILE`` line may carry (``name=N``, 0 = unlimited)."""

BUDGET_NAMES = ("tokens_per_day", "usd_per_month")
"""Per-tenant budgets a ``GATEWAY_TENANTS_FILE`` line may carry (``tokens_per_day=N``,
``usd_per_month=X`` a decimal; 0 = unlimited): see :mod:`hosting.gateway.budgets`."""

TenantOverrides = Mapping[str, Mapping[str, int]]
"""Tenant name → the quota limits its lines of ``GATEWAY_TENANTS_FILE`` override."""

TenantBudgetOverrides = Mapping[str, Mapping[str, float]]
"""Tenant name → the budgets its lines of ``GATEWAY_TENANTS_FILE`` set."""

_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


def usd_amount(raw: str, what: str) -> float:
    """A budget in US dollars: a decimal number >= 0 (``25``, ``0.5``); ``what`` names the
    variable or line in the :class:`ConfigError`."""
    value = float(raw) if _DECIMAL.fullmatch(raw.strip()) else math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a decimal number of US dollars >= 0 (0 = unlimited), got {raw!r}")
    return value


def _override(item: str, where: str) -> tuple[str, float]:
    name, sep, raw = item.partition("=")
    if not sep or name not in LIMIT_NAMES + BUDGET_NAMES:
        raise ConfigError(f"{where}: unknown setting {name!r}; expected name=N with name one of "
                          f"{', '.join(LIMIT_NAMES + BUDGET_NAMES)}")
    if name == "usd_per_month":
        return name, usd_amount(raw, f"{where}: {name}")
    if not raw.isdigit() or not raw.isascii():
        raise ConfigError(f"{where}: {name} must be a whole number >= 0 (0 = unlimited), got {raw!r}")
    return name, int(raw)


def _read_tenants_file(path: str) -> tuple[dict[bytes, str], dict[str, dict[str, float]]]:
    """Lines ``tenant sha256:<hex of token> [max_sandboxes=N] [max_turns=N] [turns_per_minute=N]
    [tokens_per_day=N] [usd_per_month=X]``."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"GATEWAY_TENANTS_FILE {path}: {exc.strerror}") from None
    tokens: dict[bytes, str] = {}
    overrides: dict[str, dict[str, float]] = {}
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"GATEWAY_TENANTS_FILE line {number}"
        fields = line.split()
        if len(fields) < 2 or not fields[1].startswith("sha256:"):
            raise ConfigError(f"{where}: expected 'tenant sha256:<64 hex digits> [name=N ...]'")
        try:
            digest = bytes.fromhex(fields[1].removeprefix("sha256:"))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where}: expected 'tenant sha256:<64 hex digits> [name=N ...]'")
        tenant = _tenant_name(fields[0], where)
        tokens[digest] = tenant
        limits = overrides.setdefault(tenant, {})
        for item in fields[2:]:
            name, value = _override(item, where)
            if limits.get(name, value) != value:
                raise ConfigError(f"{where}: {name} for tenant {tenant!r} differs from an earlier line")
            limits[name] = value
    return tokens, {tenant: limits for tenant, limits in overrides.items() if limits}


def load_tenant_tokens(inline: str, path: str | None) -> dict[bytes, str]:
    """Tenants from ``GATEWAY_TENANTS`` (``token:tenant,token:tenant``) and from the
    file ``GATEWAY_TENANTS_FILE`` (lines ``tenant sha256:<hex of token>``, ``#`` comments,
    optionally followed by quota overrides: see :func:`load_tenant_overrides`).

    Error messages name the variable and line, never a token.
    """
    tokens: dict[bytes, str] = {}
    for number, item in enumerate((part.strip() for part in inline.split(",")), start=1):
        if not item:
            continue
        token, sep, tenant = item.rpartition(":")
        if not sep or not token.strip():
            raise ConfigError(f"GATEWAY_TENANTS entry {number} is not token:tenant")
        tokens[_digest(token.strip())] = _tenant_name(tenant.strip(), f"GATEWAY_TENANTS entry {number}")
    if path is not None:
        tokens.update(_read_tenants_file(path)[0])
    return tokens


def load_tenant_overrides(path: str | None) -> dict[str, dict[str, int]]:
    """Per-tenant quota limits from ``GATEWAY_TENANTS_FILE``: the ``name=N`` fields after a
    line's digest (``alice sha256:<hex> max_sandboxes=5 max_turns=2 turns_per_minute=30``).
    A tenant with several tokens may repeat them on each line, but not contradict itself."""
    overrides = {} if path is None else _read_tenants_file(path)[1]
    return {tenant: limits for tenant, values in overrides.items()
            if (limits := {name: int(value) for name, value in values.items() if name in LIMIT_NAMES})}


def load_tenant_budgets(path: str | None) -> dict[str, dict[str, float]]:
    """Per-tenant budgets from ``GATEWAY_TENANTS_FILE``: ``tokens_per_day=N`` and
    ``usd_per_month=X`` after a line's digest, like the quota limits
    (``alice sha256:<hex> tokens_per_day=1000000 usd_per_month=25``)."""
    overrides = {} if path is None else _read_tenants_file(path)[1]
    return {tenant: budget for tenant, values in overrides.items()
            if (budget := {name: value for name, value in values.items() if name in BUDGET_NAMES})}
