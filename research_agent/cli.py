"""``research-agent "question"``: ask the research agent from a terminal."""

from __future__ import annotations

import argparse
import os
import sys

import anyio
from claude_agent_sdk import ClaudeSDKError

from research_agent.agent import AgentError, send_query
from research_agent.options import DEFAULT_MODEL, build_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="research-agent", description=__doc__)
    parser.add_argument("question", help="what to research")
    parser.add_argument("--model", default=os.environ.get("MODEL") or DEFAULT_MODEL,
                        help="model id (default: $MODEL or %(default)s)")
    args = parser.parse_args(argv)
    try:
        answer = anyio.run(lambda: send_query(args.question, options=build_options(model=args.model)))
    except (AgentError, ClaudeSDKError) as exc:
        print(f"research-agent: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0
