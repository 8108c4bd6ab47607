"""``python -m bench``: measure what hosting costs, against the offline local model.

The local model answers with zero delay, so every millisecond measured is spent
in the server, the SDK and the Claude Code CLI: exactly the overhead hosting
adds or saves. All scenarios run in one invocation on one machine, so the
ratios between them are comparable. See ``bench/README.md``.
"""
