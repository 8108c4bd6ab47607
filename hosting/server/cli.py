"""Which Claude Code executable the server starts, and how.

The CLI comes bundled inside the claude-agent-sdk wheel. The server starts it
through ``bin/claude-guarded`` so that it dies with the server (parent-death
signal), which a plain child process does not do on SIGKILL.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import claude_agent_sdk

logger = logging.getLogger("hosting.server.cli")

GUARD = Path(__file__).parent.parent / "bin" / "claude-guarded"
BUNDLED_CLI = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"


def guarded_cli() -> tuple[str | None, dict[str, str]]:
    """``(cli_path, extra_env)`` for ClaudeAgentOptions; unguarded if setpriv is missing."""
    if not BUNDLED_CLI.exists():
        return None, {}
    if shutil.which("setpriv") is None:
        logger.warning("setpriv (util-linux) not found: CLIs will not be killed if the server is SIGKILLed")
        return None, {}
    return str(GUARD), {"AGENT_REAL_CLI": str(BUNDLED_CLI)}
