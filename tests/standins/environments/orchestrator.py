"""``agent-environment-orchestrator`` as a real process, pointed at the stand-in."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.processes import Process
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
    process: Process | None = field(default=None)

    def start(self) -> OrchestratorProcess:
        self.process = Process([sys.executable, "-m", "hosting.environments"], log_path=self.log_path,
                               name="the orchestrator", cwd=ROOT, env=self.env)
        self.process.wait_until(lambda: "serving environment" in self.log(), timeout=30, interval=0.05)
        return self

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def kill(self) -> None:
        """SIGKILL the orchestrator only (not its group): a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM and up to 15 s to exit by itself, then its whole process group."""
        if self.process is not None:
            self.process.stop(signal.SIGTERM, grace=15)
