"""A missing optional driver is one clear start-up error naming the extra, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def run_without(module: str, entry: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``entry``'s ``main()`` as if ``module`` were not installed."""
    code = f"import sys; sys.modules[{module!r}] = None\nfrom {entry} import main\nmain()"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "GATEWAY_", "ANTHROPIC_"))}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_a_postgres_store_without_the_stores_extra(tmp_path: Path) -> None:
    proc = run_without("psycopg", "hosting.server.app", {
        "AGENT_SESSION_STORE": "postgresql://user:secret-pw@127.0.0.1:1/db", "ANTHROPIC_API_KEY": "x",
        "AGENT_DATA_DIR": str(tmp_path), "PORT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "research-agent-hosting[stores]"' in proc.stderr
    assert "Traceback" not in proc.stderr and "secret-pw" not in proc.stderr


def test_the_docker_backend_without_the_docker_extra(tmp_path: Path) -> None:
    proc = run_without("docker", "hosting.gateway.app", {
        "GATEWAY_BACKEND": "docker", "GATEWAY_TENANTS": "t:alice", "ANTHROPIC_API_KEY": "x",
        "GATEWAY_DATA_DIR": str(tmp_path), "PORT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "research-agent-hosting[docker]"' in proc.stderr
    assert "Traceback" not in proc.stderr
