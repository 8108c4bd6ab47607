"""Tenant quotas' configuration: finite defaults, per-tenant overrides from the tenants file,
and errors that name the line or the variable, never the token (the quotas themselves:
tests/e2e/test_gateway_quotas.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hosting.gateway.quotas import TenantLimits
from hosting.gateway.settings import GatewaySettings
from hosting.gateway.tenants import load_tenant_overrides, load_tenant_tokens
from hosting.settings_env import ConfigError

BASE_ENV = {"GATEWAY_TENANTS": "tok-a:alice", "ANTHROPIC_API_KEY": "sk-x"}


def test_defaults_are_finite_and_overridable_per_tenant(tmp_path: Path) -> None:
    defaults = GatewaySettings.from_env(BASE_ENV)
    assert defaults.tenant_limits == TenantLimits(max_sandboxes=50, max_turns=25, turns_per_minute=120)
    digest = hashlib.sha256(b"tok-bob").hexdigest()
    other = hashlib.sha256(b"tok-bob-2").hexdigest()
    path = tmp_path / "tenants"
    path.write_text(f"# two tokens for bob\nbob sha256:{digest} max_turns=2 turns_per_minute=0  # unlimited\n"
                    f"bob sha256:{other} max_turns=2\ncarol sha256:{'ab' * 32}\n")
    settings = GatewaySettings.from_env({**BASE_ENV, "GATEWAY_TENANTS_FILE": str(path),
                                         "GATEWAY_TENANT_MAX_SANDBOXES": "7", "GATEWAY_TENANT_MAX_TURNS": "3",
                                         "GATEWAY_TENANT_TURNS_PER_MINUTE": "0"})
    assert settings.limits_for("alice") == TenantLimits(7, 3, 0)
    assert settings.limits_for("carol") == TenantLimits(7, 3, 0)
    assert settings.limits_for("bob") == TenantLimits(7, 2, 0)
    assert set(settings.tenants.values()) == {"alice", "bob", "carol"}, "the old line format still works"
    assert load_tenant_overrides(str(path)) == {"bob": {"max_turns": 2, "turns_per_minute": 0}}


@pytest.mark.parametrize("line, fragment", [
    ("bob sha256:{d} max_turns", "unknown setting 'max_turns'"),
    ("bob sha256:{d} max_cpus=2", "unknown setting 'max_cpus'"),
    ("bob sha256:{d} max_turns=-1", "max_turns must be a whole number"),
    ("bob sha256:{d} max_turns=two", "max_turns must be a whole number"),
    ("bob sha256:{d} max_turns=2\nbob sha256:{d} max_turns=3", "line 2: max_turns for tenant 'bob' differs"),
    ("bob tok-secret-1 max_turns=2", "line 1: expected"),
])
def test_bad_overrides_name_the_line_never_the_token(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "tenants"
    path.write_text(line.format(d=hashlib.sha256(b"tok-secret-1").hexdigest()))
    with pytest.raises(ConfigError) as raised:
        load_tenant_tokens("", str(path))
    assert fragment in str(raised.value) and "tok-secret-1" not in str(raised.value)


@pytest.mark.parametrize("name", ["GATEWAY_TENANT_MAX_SANDBOXES", "GATEWAY_TENANT_MAX_TURNS",
                                  "GATEWAY_TENANT_TURNS_PER_MINUTE"])
def test_bad_quota_settings_name_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        GatewaySettings.from_env({**BASE_ENV, name: "-1"})
