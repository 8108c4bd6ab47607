"""Driving turns, through the server (HTTP/SSE) and directly through the SDK, and summarising them.

Both paths are timed the same way, from the caller's point of view: from sending
the prompt until the caller is free to send the next one (the ``done`` event
over HTTP; the end of ``query()`` directly, which includes the CLI exiting).
The time to the ``result`` is recorded too.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ResultMessage, TextBlock, query
from httpx_sse import SSEError

from bench.procs import API_KEY
from harness.sse import aturn_stream, awire_events
from research_agent.options import DEFAULT_MODEL, build_options

RECALL = "What value did I ask you to remember?"
TURN_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def remember_prompt() -> tuple[str, str]:
    """A fresh value and the prompt that asks the model to remember it."""
    value = f"v{secrets.token_hex(6)}"
    return value, f"Remember this value: {value}"


@dataclass
class TurnResult:
    latency: float
    to_result: float | None
    text: str
    error: str | None = None
    retry_after: str | None = None  # the Retry-After of a refusal (a non-200 answer)


def recalled(turn: TurnResult, value: str) -> bool:
    """The recall rule: the turn succeeded and its streamed text names the remembered value."""
    return turn.error is None and value in turn.text


def http_client(connections: int = 200) -> httpx.AsyncClient:
    """One client for a whole scenario; enough connections for every concurrent stream."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=TURN_TIMEOUT, limits=limits)


async def http_turn(client: httpx.AsyncClient, base_url: str, session_id: str, prompt: str) -> TurnResult:
    """One turn through the server; never raises, failures come back in ``error``."""
    started = time.perf_counter()
    parts: list[str] = []
    to_result: float | None = None
    error: str | None = None
    retry_after: str | None = None
    done = False
    latency = 0.0
    try:
        async with aturn_stream(client, base_url, session_id, prompt) as source:
            if source.response.status_code != 200:
                body = (await source.response.aread()).decode(errors="replace")[:200]
                error = f"HTTP {source.response.status_code}: {body}"
                retry_after = source.response.headers.get("retry-after")
            else:
                async for event in awire_events(source):
                    data = event["data"]
                    if event["event"] == "text":
                        parts.append(data.get("text", ""))
                    elif event["event"] == "result":
                        to_result = time.perf_counter() - started
                    elif event["event"] == "error" and error is None:
                        error = f"{data.get('code')}: {data.get('message')}"
                    elif event["event"] == "done":
                        # Timed to done; the loop then reads the body's end (untimed), so the connection
                        # is kept, as hosting.client does.
                        latency = time.perf_counter() - started
                        done = True
    except (httpx.HTTPError, SSEError, json.JSONDecodeError) as exc:
        if not done:
            error = f"{type(exc).__name__}: {exc}"
    if not done and error is None:
        error = "stream ended without a done event"
    return TurnResult(latency if done else time.perf_counter() - started, to_result, "".join(parts), error, retry_after)


async def http_turn_retrying(client: httpx.AsyncClient, base_url: str, session_id: str, prompt: str,
                             refusals: list[str], attempts: int = 20) -> TurnResult:
    """A turn as a well-behaved client makes it: a 503 with ``Retry-After`` (the server had no
    room) is retried after that long, and recorded in ``refusals``; anything else counts as is.
    The latency is the caller's whole wait, refusals included."""
    started = time.perf_counter()
    for _ in range(attempts):
        turn = await http_turn(client, base_url, session_id, prompt)
        if not (turn.error or "").startswith("HTTP 503") or turn.retry_after is None:
            break
        refusals.append(turn.error or "")
        await asyncio.sleep(float(turn.retry_after))
    turn.latency = time.perf_counter() - started
    return turn


def direct_options(workdir: Path, model_url: str, **session: Any) -> ClaudeAgentOptions:
    """The research agent's own options, pointed at the local model, in a private directory."""
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    env = {
        "CLAUDE_CONFIG_DIR": str(workdir / "config"),
        "HOME": str(workdir),  # keep the CLI out of the real home directory
        "ANTHROPIC_BASE_URL": model_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    return build_options(model=DEFAULT_MODEL, cwd=workdir, env=env, **session)


async def direct_turn(prompt: str, options: ClaudeAgentOptions) -> tuple[TurnResult, str | None]:
    """One ``claude_agent_sdk.query()``: a CLI spawned, used once, closed. Returns the session id."""
    started = time.perf_counter()
    parts: list[str] = []
    to_result: float | None = None
    session_id: str | None = None
    error: str | None = None
    try:
        async for message in query(prompt=prompt, options=options):
            if isinstance(message, AssistantMessage):
                parts.extend(b.text for b in message.content if isinstance(b, TextBlock))
            elif isinstance(message, ResultMessage):
                to_result = time.perf_counter() - started
                session_id = message.session_id
                if message.is_error:
                    error = f"result {message.subtype}: {message.result}"
    except Exception as exc:  # noqa: BLE001 - a failed turn is a measurement, not a crash
        error = f"{type(exc).__name__}: {exc}"
    if to_result is None and error is None:
        error = "query() ended without a result"
    return TurnResult(time.perf_counter() - started, to_result, "".join(parts), error), session_id


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: always a value that was actually observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(turns: list[TurnResult], wall: float | None = None, recall_expected: int = 0,
              recall_ok: int = 0) -> dict[str, Any]:
    """Latency percentiles and throughput (over ``wall``) count successful turns only, so a server
    that fails fast cannot look fast; failures are counted in ``errors``."""
    ok = [t.latency for t in turns if t.error is None]
    out: dict[str, Any] = {
        "turns": len(turns),
        "errors": sum(1 for t in turns if t.error is not None),
        "p50_s": percentile(ok, 50),
        "p95_s": percentile(ok, 95),
        "mean_s": sum(ok) / len(ok) if ok else None,
        "p50_to_result_s": percentile([t.to_result for t in turns if t.to_result is not None], 50),
        "error_samples": sorted({t.error for t in turns if t.error})[:5],
    }
    if wall is not None:
        out["wall_s"] = wall
        out["turns_per_s"] = len(ok) / wall if wall > 0 else None  # failed turns are not throughput
    if recall_expected:
        out["recall_ok"] = recall_ok
        out["recall_expected"] = recall_expected
    out["latencies_s"] = [round(t.latency, 4) for t in turns]
    return out
