"""run_once / entrypoint.sh: the batch-job tier, through the real entrypoint script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.servers import agent_env

pytestmark = pytest.mark.e2e

ENTRYPOINT = ROOT / "hosting" / "entrypoint.sh"


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "PYTHON": sys.executable}
    return subprocess.run([str(ENTRYPOINT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_prints_the_answer_and_exits_0(local_model, tmp_path):
    proc = run_entrypoint(agent_env(local_model, tmp_path, PROMPT="What do otters eat?"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Local model answer to: What do otters eat?")
    assert "## Sources" in proc.stdout


def test_progress_goes_to_stderr_not_stdout(local_model, tmp_path):
    prompt = 'Otters [[think]] [[tool:WebSearch {"query": "otter diet"}]]'
    proc = run_entrypoint(agent_env(local_model, tmp_path, PROMPT=prompt))
    assert proc.returncode == 0, proc.stderr
    assert "[tool] WebSearch: otter diet" in proc.stderr and "[thinking]" in proc.stderr
    assert "[tool]" not in proc.stdout and "https://example.org/otter-diet/1" in proc.stdout


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_missing_prompt_exits_2_with_a_message(local_model, tmp_path, prompt):
    env = agent_env(local_model, tmp_path)
    if prompt is not None:
        env["PROMPT"] = prompt
    before = local_model.requests_total()
    proc = run_entrypoint(env)
    assert proc.returncode == 2
    assert "PROMPT" in proc.stderr and proc.stdout == ""
    assert local_model.requests_total() == before


def test_api_error_exits_nonzero_with_the_error_on_stderr(local_model, tmp_path):
    proc = run_entrypoint(agent_env(local_model, tmp_path, PROMPT="fail [[error:529]]"))
    assert proc.returncode == 1
    assert "API Error: 529" in proc.stderr and proc.stdout == ""


def test_missing_credentials_exits_2(local_model, tmp_path):
    env = agent_env(local_model, tmp_path, PROMPT="hi")
    del env["ANTHROPIC_API_KEY"]
    proc = run_entrypoint(env)
    assert proc.returncode == 2 and "ANTHROPIC_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr
