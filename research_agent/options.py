"""How the research agent is configured for the Claude Agent SDK.

One builder serves the terminal CLI, run-once jobs and the hosted server, so the
agent behaves the same everywhere; hosting adds only isolation (working and
config directories, environment) on top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from claude_agent_sdk import ClaudeAgentOptions

from research_agent.prompts import SYSTEM_PROMPT

DEFAULT_MODEL = "claude-sonnet-4-6"

RESEARCH_TOOLS: tuple[str, ...] = ("WebSearch",)
"""The only tools that exist for the agent. Passed as ``tools=`` so every other
built-in tool (Bash, Read, Grep, ...) is absent, not merely unapproved."""


def build_options(
    *,
    model: str = DEFAULT_MODEL,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> ClaudeAgentOptions:
    """Options for one research-agent session.

    ``overrides`` are passed through to :class:`ClaudeAgentOptions` (session
    ids, streaming of partial messages, ...).
    """
    return ClaudeAgentOptions(
        model=model,
        system_prompt=SYSTEM_PROMPT,
        tools=list(RESEARCH_TOOLS),
        allowed_tools=list(RESEARCH_TOOLS),
        permission_mode="dontAsk",
        setting_sources=[],
        verbatim_prompts=True,
        cwd=str(cwd) if cwd is not None else None,
        env=dict(env or {}),
        **overrides,
    )
