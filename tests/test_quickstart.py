"""The README's two set-up commands are the ones that work."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_main_job_then_the_tests():
    assert BLOCKS[0].strip() == "./scripts/quickstart.sh"
    assert BLOCKS[1].strip() == "./scripts/test.sh"
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.e2e
def test_main_job_command_holds_a_two_turn_conversation_with_recall(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_", "CLAUDE_", "VIRTUAL_ENV"))}
    env.update(VENV=str(tmp_path / "venv"), AGENT_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(["sh", "-c", BLOCKS[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    value = re.search(r"Remember this value: (\w+)", proc.stdout).group(1)
    assert f"You asked me to remember {value}." in proc.stdout
    assert f"OK: the second turn recalled '{value}'." in proc.stdout
