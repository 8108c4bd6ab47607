"""The gateway on the modal backend, end to end, against the stand-in of Modal's control plane.

A real gateway process (``GATEWAY_BACKEND=modal``) runs its warm pool and each session's
sandbox as Modal Sandboxes through the real ``modal`` client, and relays turns through
their tunnels (HTTPS on 127.0.0.1, trusted through ``SSL_CERT_FILE``) to the real server,
SDK and CLI, which answer from the local model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.standins.modal import ModalStandIn
from tests.support.gateways import ALICE, BOB, Gateways, auth
from tests.support.polling import wait_for
from tests.support.servers import LocalModel
from tests.support.turns import post_turn

pytestmark = [pytest.mark.modal, pytest.mark.docker, pytest.mark.e2e]

RECALL = "What value did I ask you to remember?"


@pytest.fixture
def modal_gateways(local_model: LocalModel, modal_env: dict[str, str], modal_standin: ModalStandIn,
                   tmp_path: Path) -> Iterator[Gateways]:
    """Gateways on the modal backend; their sandboxes are terminated at the end, whatever happened."""
    factory = Gateways(local_model, tmp_path, "modal", None)
    try:
        yield factory
    finally:
        factory.cleanup()
        modal_standin.terminate_tagged("research-agent.installation", {factory.installation})


def test_recall_through_the_gateway_and_a_replaced_sandbox_resumes(modal_gateways: Gateways, modal_env: dict[str, str],
                                                                    modal_standin: ModalStandIn, tmp_path: Path) -> None:
    """The first turn claims the warm Modal sandbox (re-tagged with its session and tenant); the
    next recalls; another tenant gets 403; after the sandbox crashes, the next turn runs in a new
    sandbox on the same Modal Volume and still recalls."""
    gateway = modal_gateways.start(**{**modal_env, "HOME": str(tmp_path)})
    pooled = set(gateway.pool()["sandboxes"])
    assert len(pooled) == 1

    url = gateway.base_url
    first = post_turn(url, "trip-1", "Remember this value: 4471", headers=auth(ALICE))
    assert first.types[0] == "session" and first.types[-1] == "done" and "error" not in first.types
    assert "You asked me to remember 4471." in post_turn(url, "trip-1", RECALL, headers=auth(ALICE)).text
    route = gateway.route("trip-1")
    assert route is not None and route["sandbox_id"] in pooled and route["address"].startswith("https://127.0.0.1:")
    listed = {s["sandbox_id"]: s for s in gateway.sandboxes()}
    assert (listed[route["sandbox_id"]]["session_id"], listed[route["sandbox_id"]]["tenant"]) == ("trip-1", "alice")
    unknown = httpx.get(f"{url}/sessions/trip-1", headers=auth(BOB), timeout=30)
    assert unknown.status_code == 404, "alice's trip-1 is not bob's"

    crashed = modal_standin.named(route["sandbox_id"])
    for sandbox_id in crashed:
        modal_standin.kill(sandbox_id)
    wait_for(lambda: not set(crashed) & set(modal_standin.running_sandboxes()))
    again = post_turn(url, "trip-1", RECALL, headers=auth(ALICE))
    assert "You asked me to remember 4471." in again.text and again.of("session")[0]["resumed"] is True
    replaced = gateway.route("trip-1")
    assert replaced is not None and replaced["sandbox_id"] != route["sandbox_id"]
    assert replaced["volume"] == route["volume"]
