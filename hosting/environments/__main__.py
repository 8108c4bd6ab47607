"""``agent-environment-orchestrator`` and ``python -m hosting.environments``.

The orchestrator's modules import the ``anthropic`` SDK, the ``environments`` extra, so
they are imported only here, after checking it: without the extra the program says so in
one line, as the gateway does for a backend's client, never with a traceback.
"""

import sys

SDK_MISSING = 'the orchestrator needs the Anthropic SDK: pip install "research-agent-hosting[environments]"'


def main() -> None:
    try:
        from hosting.environments.app import main as run
    except ModuleNotFoundError as exc:
        if exc.name != "anthropic" and not (exc.name or "").startswith("anthropic."):
            raise
        print(f"agent-environment-orchestrator: {SDK_MISSING}", file=sys.stderr)
        sys.exit(2)
    run()


if __name__ == "__main__":
    main()
