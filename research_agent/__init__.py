"""The research agent: a Claude Agent SDK agent that searches the web and cites its sources."""

from research_agent.agent import send_query
from research_agent.options import DEFAULT_MODEL, RESEARCH_TOOLS, build_options
from research_agent.prompts import SYSTEM_PROMPT

__all__ = ["DEFAULT_MODEL", "RESEARCH_TOOLS", "SYSTEM_PROMPT", "build_options", "send_query"]
