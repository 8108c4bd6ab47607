"""The README's Python client example, as a script.

    ./scripts/quickstart.sh --serve            # in another terminal: the local model and a server
    .venv/bin/python examples/client_example.py

The base URL and the token come from ``$AGENT_BASE_URL`` (default ``http://127.0.0.1:8000``)
and ``$AGENT_AUTH_TOKEN``, so the same script talks to every tier. CI runs it
(``tests/e2e/test_client_example.py``).
"""

import asyncio

from hosting.client import AgentClient, ErrorEvent, SessionEvent, TextEvent


async def main() -> None:
    async with AgentClient(session_id="alice-1") as agent:  # $AGENT_BASE_URL, $AGENT_AUTH_TOKEN
        print(await agent.arun("Remember this value: 42"))
        async for event in agent.astream("What value did I ask you to remember?"):
            if isinstance(event, TextEvent):
                print(event.text, end="")
        print()
        async for event in agent.astream("Write a long history of the printing press."):
            if isinstance(event, SessionEvent):  # the turn runs: stop it (any task may)
                stopped = await agent.interrupt()  # False: no turn was running (it had just ended)
                print("interrupt sent" if stopped else "the turn had ended already")
            elif isinstance(event, ErrorEvent):
                print(f"the turn ended with {event.code}")  # interrupted


if __name__ == "__main__":
    asyncio.run(main())
