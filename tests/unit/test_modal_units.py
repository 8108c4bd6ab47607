"""The modal backend's pure parts, its settings, and the stand-in's refusal of what it does not implement."""

from __future__ import annotations

import subprocess
import sys

import pytest
from modal._utils.name_utils import is_valid_object_name

from hosting.gateway.settings import GatewaySettings
from hosting.sandboxes.modal import volume_name
from hosting.settings_env import ConfigError
from tests.conftest import ROOT
from tests.modal_fixtures import modal_env, modal_standin  # noqa: F401 - fixtures
from tests.modal_standin import ModalStandIn


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


def test_modal_backend_without_the_client_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['modal'] = None\n"
            "from hosting.sandboxes import SandboxError\n"
            "from hosting.sandboxes.modal import ModalBackend\n"
            "try:\n    ModalBackend()\nexcept SandboxError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == 'the Modal client is not installed: pip install "research-agent-hosting[modal]"'


@pytest.mark.modal
@pytest.mark.docker
def test_the_standin_refuses_an_rpc_it_does_not_implement_by_name(modal_env: dict[str, str],
                                                                  modal_standin: ModalStandIn) -> None:
    """A client call outside what the stand-in implements fails at once, naming the RPC, and is
    recorded, so that the test that made it fails too (``modal_env`` checks at teardown)."""
    import modal
    import modal.exception

    with pytest.raises(modal.exception.UnimplementedError, match="does not implement QueueGetOrCreate"):
        modal.Queue.from_name("work", create_if_missing=True).hydrate()
    assert modal_standin.take_problems() == ["unimplemented RPC: QueueGetOrCreate"]
