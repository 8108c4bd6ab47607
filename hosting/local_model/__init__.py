"""A deterministic stand-in for the Anthropic Messages API.

It exists so that the real Claude Code CLI (bundled in claude-agent-sdk) can be
driven end to end with no network and no API key: demos, tests and benchmarks
point ``ANTHROPIC_BASE_URL`` at it. It is not Claude, and says so in every
reply's ``model`` field and in its logs.
"""

from hosting.local_model.app import MODEL_NAME, create_app
from hosting.local_model.script import Reply, plan_reply

__all__ = ["MODEL_NAME", "Reply", "create_app", "plan_reply"]
