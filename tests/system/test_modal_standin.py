"""The stand-in of Modal's control plane refuses, by name, what it does not implement (its
sandboxes are containers of the product image: the Docker engine)."""

from __future__ import annotations

import pytest

from tests.standins.modal import ModalStandIn


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
