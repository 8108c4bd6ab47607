"""The main job on embedded defaults: local model, local disk, a two-turn conversation.

``python -m hosting.demo`` starts the offline local model and the agent server
as child processes, holds a conversation through the HTTP/SSE contract whose
second turn recalls the first, then stops both. Exit 0 only if recall worked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hosting.client import AgentClient, TextEvent, ThinkingEvent, ToolUseEvent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(url: str, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: {name} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"demo: {name} did not start within 60 s")


async def _converse(base_url: str) -> bool:
    value = secrets.token_hex(3)
    async with AgentClient(base_url, session_id=f"demo-{value}") as agent:
        for prompt in (f"Remember this value: {value}", "What value did I ask you to remember?"):
            print(f"\nyou> {prompt}\nagent> ", end="", flush=True)
            answer = []
            async for event in agent.astream(prompt):
                if isinstance(event, ToolUseEvent):
                    print(f"[{event.name}] ", end="", flush=True)
                elif isinstance(event, TextEvent) and not isinstance(event, ThinkingEvent):
                    answer.append(event.text)
                    print(event.text, end="", flush=True)
        print()
    recalled = value in "".join(answer)
    print(f"\n{'OK' if recalled else 'FAILED'}: the second turn {'recalled' if recalled else 'did not recall'} {value!r}.")
    return recalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("AGENT_DATA_DIR") or ".agent-data"),
                        help="where sessions and logs are kept (default: $AGENT_DATA_DIR or %(default)s)")
    args = parser.parse_args(argv)
    model_port, server_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{model_port}",
        "ANTHROPIC_API_KEY": os.environ.get("ANTHROPIC_API_KEY") or "local-model-needs-no-key",
        "AGENT_DATA_DIR": str(args.data_dir.resolve()),
        "HOST": "127.0.0.1",
        "PORT": str(server_port),
    }
    log_dir = args.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *command: str) -> subprocess.Popen[bytes]:
        log = open(log_dir / f"{name}.log", "ab")
        children.append(subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log, stderr=subprocess.STDOUT))
        return children[-1]

    try:
        print(f"Starting the local model (not Claude) on 127.0.0.1:{model_port} ...")
        model = spawn("local-model", "hosting.local_model", "--port", str(model_port))
        _wait_healthy(f"http://127.0.0.1:{model_port}/local/requests", model, "the local model")
        print(f"Starting the agent server on 127.0.0.1:{server_port}, sessions and logs in {args.data_dir} ...")
        server = spawn("agent-server", "hosting.server")
        _wait_healthy(f"http://127.0.0.1:{server_port}/health", server, "the agent server")
        return 0 if asyncio.run(_converse(f"http://127.0.0.1:{server_port}")) else 1
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
