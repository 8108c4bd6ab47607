"""Fixtures of the Modal tier's tests: one stand-in of Modal's control plane per session.

The stand-in serves real gRPC on 127.0.0.1; the pinned ``modal`` client is pointed at it
with ``MODAL_SERVER_URL`` and the stand-in's workspace token, its config file isolated.
Sandboxes are containers of the image the stand-in builds from ``hosting/Dockerfile`` (the
first build of a session takes as long as ``agent_image``'s; it shares Docker's layer
cache with it). Every test ends by asserting that the client called no RPC the stand-in
does not implement and that no handler broke. A plugin (``tests/conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.standins.modal import ModalStandIn
from tests.support import ROOT
from tests.support.images import BASE_IMAGE

MODAL_APP = "research-agent-gateway"
"""The app the gateway's modal backend runs sandboxes in (its default)."""


@pytest.fixture(scope="session")
def modal_standin(agent_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModalStandIn]:
    """The stand-in, for the whole session (its image cache with it): in-process ``modal``
    clients are created once per process and would keep talking to the first stand-in.
    ``agent_image`` builds the base image the stand-in's builder resolves ``BASE_IMAGE`` to,
    and warms Docker's cache."""
    standin = ModalStandIn(tmp_path_factory.mktemp("modal-standin"), BASE_IMAGE)
    try:
        standin.start()
        build_agent_image(standin)
        yield standin
    finally:
        standin.stop()


BUILD = """
import asyncio, modal
from hosting.sandboxes.modal import agent_image

async def build():
    await agent_image().build.aio(await modal.App.lookup.aio("image-builds", create_if_missing=True))

asyncio.run(build())
"""


def build_agent_image(standin: ModalStandIn) -> None:
    """Build the agent image through the client once, so that no test's own deadline pays for it
    (the stand-in keeps it, keyed by its definition, as Modal does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    proc = subprocess.run([sys.executable, "-c", BUILD], cwd=ROOT, env={**env, **standin.env(standin.root)},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"the agent image did not build on the stand-in:\n{proc.stderr[-3000:]}"


@pytest.fixture
def modal_env(modal_standin: ModalStandIn, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The environment that points the ``modal`` client at the stand-in (also set in this
    process, for backends used in-process); fails the test if the client called an RPC
    the stand-in does not implement, or a handler broke."""
    env = modal_standin.env(modal_standin.root)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env
    assert modal_standin.take_problems() == []


def subprocess_env(modal_env: dict[str, str], home: Path) -> dict[str, str]:
    """This process's environment without anything of Modal's or the agent's, then ``modal_env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "ANTHROPIC_", "AGENT_", "CLAUDE_"))}
    return {**env, "HOME": str(home), **modal_env}
