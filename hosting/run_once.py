"""Run the agent once on ``$PROMPT`` and print the answer: the batch-job tier.

Exit codes: 0 answer printed on stdout; 1 the agent or the model failed (the
error on stderr); 2 bad configuration (no ``PROMPT``, no credentials).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import anyio
from claude_agent_sdk import ClaudeSDKError

from hosting.server.settings import Settings
from hosting.settings_env import ConfigError
from research_agent.agent import AgentError, send_query
from research_agent.options import build_options

EXIT_FAILED = 1
EXIT_USAGE = 2


def main() -> int:
    prompt = os.environ.get("PROMPT", "").strip()
    if not prompt:
        print("run-once: set PROMPT to the question to ask (e.g. docker run -e PROMPT='...')", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = Settings.from_env()
        settings.require_credentials()
    except ConfigError as exc:
        print(f"run-once: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="run-once-") as scratch:
        root = Path(scratch)
        (root / "work").mkdir()
        env = {**settings.cli_env(), "HOME": scratch, "CLAUDE_CONFIG_DIR": str(root / "config"), "TMPDIR": scratch}
        options = build_options(model=settings.model, cwd=root / "work", env=env,
                                max_budget_usd=settings.max_budget_usd)
        try:
            answer = anyio.run(lambda: send_query(prompt, options=options))
        except (AgentError, ClaudeSDKError) as exc:
            print(f"run-once: the agent failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
