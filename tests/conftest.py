"""The suite's tiers, and its shared fixtures registered once for the whole run.

A test's tier is the directory it is in, and becomes its marker (``-m unit``, ...):

- ``unit``: pure logic, in this process (ASGI apps through httpx's ASGI transport); no
  subprocess, no server process, no real store, no CLI.
- ``integration``: real Redis and PostgreSQL, the stand-ins (``tests/standins``), kubectl,
  agent and gateway processes that run no turn.
- ``e2e``: turns through the real claude-agent-sdk and its Claude Code CLI, against the
  local model.
- ``system``: the Docker engine, the notebook, the browser, network namespaces and nginx.

The fixture modules are plugins, so that a session fixture exists once per run (per
pytest-xdist worker): one Redis and one PostgreSQL serve the suite. A module imports
helpers from ``tests.support``, never fixtures.
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.support.servers",
    "tests.support.images",
    "tests.support.stores",
    "tests.support.gateways",
    "tests.support.modal_standin",
]

TIERS = ("unit", "integration", "e2e", "system")


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in a tier's directory: tests/{{{','.join(TIERS)}}}/")
        item.add_marker(tier)
