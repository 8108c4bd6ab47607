"""``send_query``: run one research question and show progress as it happens."""

from __future__ import annotations

import sys
from typing import TextIO

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ResultError,
    ResultMessage,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    query,
)

from research_agent.options import build_options


class AgentError(RuntimeError):
    """The agent finished without an answer (API error, budget, ...)."""


def _describe_tool(block: ToolUseBlock) -> str:
    detail = block.input.get("query") or block.input.get("url") or ""
    return f"{block.name}: {detail}" if detail else block.name


async def send_query(
    prompt: str,
    *,
    options: ClaudeAgentOptions | None = None,
    progress: TextIO = sys.stderr,
) -> str:
    """Ask the agent once and return its final answer.

    Thinking and tool use are written to ``progress`` as they happen (stderr by
    default, so the answer alone can be piped from stdout). Raises
    :class:`AgentError` when the run ends in an error.
    """
    options = options or build_options()
    answer_parts: list[str] = []
    result: ResultMessage | None = None
    try:
        async for message in query(prompt=prompt, options=options):
            if isinstance(message, AssistantMessage):
                for block in message.content:
                    if isinstance(block, ThinkingBlock):
                        progress.write(f"[thinking] {block.thinking}\n")
                    elif isinstance(block, ToolUseBlock):
                        progress.write(f"[tool] {_describe_tool(block)}\n")
                    elif isinstance(block, TextBlock):
                        answer_parts.append(block.text)
                progress.flush()
            elif isinstance(message, ResultMessage):
                result = message
    except ResultError as exc:
        raise AgentError(exc.result or str(exc)) from exc
    if result is None:
        raise AgentError("the agent ended without a result")
    if result.is_error:
        raise AgentError(result.result or f"agent run failed ({result.subtype})")
    cost = f", ${result.total_cost_usd:.4f}" if result.total_cost_usd else ""
    progress.write(f"[done] {result.num_turns} model turns, {result.duration_ms} ms{cost}\n")
    return result.result if result.result is not None else "\n".join(answer_parts)
