"""``agent-environment-orchestrator`` as a real process, pointed at the stand-in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.standins.environments.service import EnvironmentStandIn
from tests.support import ROOT


def orchestrator_env(standin: EnvironmentStandIn, data_dir: Path, key_file: Path, installation: str,
                     **extra: str) -> dict[str, str]:
    """The orchestrator's environment: the stand-in as the API, the key in a file, quick timers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_", "CLAUDE_", "ENVIRONMENT_"))}
    env.update({
        "ANTHROPIC_BASE_URL": standin.base_url,
        "ANTHROPIC_ENVIRONMENT_ID": standin.environment_id,
        "ANTHROPIC_ENVIRONMENT_KEY_FILE": str(key_file),
        "ENVIRONMENT_DATA_DIR": str(data_dir),
        "ENVIRONMENT_INSTALLATION": installation,
        "ENVIRONMENT_JANITOR_SECONDS": "1",
        "ENVIRONMENT_RUNNER_MAX_IDLE_SECONDS": "1",
        "ENVIRONMENT_RECLAIM_MS": "3000",
        "ENVIRONMENT_RETRY_MAX_SECONDS": "2",
    })
    env.update(extra)
    return env


@dataclass
class OrchestratorProcess:
    """One orchestrator process; :meth:`stop` ends it and its process group."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> OrchestratorProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "hosting.environments"], cwd=ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while "serving environment" not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"the orchestrator exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the orchestrator did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the orchestrator only (not its group): a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
