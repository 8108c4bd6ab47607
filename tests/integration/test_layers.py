"""The gateway and the Managed Agents orchestrator never load the agent SDK: they run no turn.

The static rules are pyproject.toml's ``[tool.importlinter]`` (``lint-imports`` in
scripts/test.sh); this checks what a real import loads, lazy and optional imports
included. In a fresh interpreter, so that other tests' imports cannot hide a regression.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT

CHECK = """
import runpy, sys

def loaded_by(name):
    return "claude_agent_sdk" in sys.modules and name

for module in ("hosting.gateway.app", "hosting.environments.app"):
    __import__(module)
    assert not loaded_by(module), module
for package in ("hosting.gateway", "hosting.environments"):
    try:  # the entry point reads its settings and refuses to start: nothing is configured
        runpy.run_module(package, run_name="__main__")
    except SystemExit as exc:
        assert exc.code == 2, (package, exc.code)
    assert not loaded_by(package), package + ".__main__"
print("no claude_agent_sdk")
"""


def test_importing_and_starting_the_gateway_and_the_orchestrator_loads_no_agent_sdk() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "GATEWAY_", "ANTHROPIC_", "ENVIRONMENT_"))}
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no claude_agent_sdk"
