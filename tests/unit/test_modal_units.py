"""The modal backend's pure parts and its settings (without the client: tests/integration/test_dependencies.py;
the stand-in's refusals: tests/system/test_modal_standin.py)."""

from __future__ import annotations

import pytest
from modal._utils.name_utils import is_valid_object_name

from hosting.gateway.settings import GatewaySettings
from hosting.sandboxes.modal import volume_name
from hosting.settings_env import ConfigError


def test_volume_names_are_per_installation_valid_for_modal_and_distinct_when_shortened() -> None:
    assert volume_name("prod", "vol-1") == "agent-prod-vol-1"
    long_a, long_b = "v" * 63 + "a", "v" * 63 + "b"
    names = {volume_name("installation-twenty-", long_a), volume_name("installation-twenty-", long_b)}
    assert len(names) == 2 and all(len(name) <= 64 and is_valid_object_name(name) for name in names)
    assert volume_name("a", "vol-1") != volume_name("b", "vol-1")
    with pytest.raises(ValueError):
        volume_name("prod", "../escape")


def test_gateway_settings_take_the_modal_backend_and_its_secrets() -> None:
    """With ``GATEWAY_MODAL_SECRETS`` the model key may live in a Modal secret; without it the
    gateway still insists on a credential in its own environment."""
    base = {"GATEWAY_TENANTS": "token-1:acme", "GATEWAY_BACKEND": "modal"}
    settings = GatewaySettings.from_env({**base, "GATEWAY_MODAL_SECRETS": "anthropic, extra ,", "GATEWAY_MODAL_APP": "gw"})
    sandboxes = settings.sandboxes
    assert (sandboxes.backend, sandboxes.modal_app, sandboxes.modal_secrets) == ("modal", "gw", ("anthropic", "extra"))
    with pytest.raises(ConfigError, match="No model credentials"):
        GatewaySettings.from_env(base)


def test_the_deploy_script_takes_the_sandboxs_limits_and_refuses_too_little_memory(
        capsys: pytest.CaptureFixture[str]) -> None:
    from hosting.modal.modal_app import parse

    assert (parse([]).memory_mib, parse([]).cpus) == (1024, 1.0)
    options = parse(["--memory-mib", "2048", "--cpus", "2"])
    assert (options.memory_mib, options.cpus) == (2048, 2.0)
    with pytest.raises(SystemExit):
        parse(["--memory-mib", "256"])
    assert "--memory-mib >= 512" in capsys.readouterr().err
