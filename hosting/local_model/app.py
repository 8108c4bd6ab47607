"""HTTP face of the local model: the Messages API subset the Claude Code CLI uses."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hosting.local_model.script import API_ERRORS, Reply, plan_reply

MODEL_NAME = "local-model-not-claude"
logger = logging.getLogger("hosting.local_model")


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _chunks(text: str) -> list[str]:
    """Split text into word-sized pieces so slow streams trickle out."""
    pieces = text.split(" ")
    return [p + (" " if i < len(pieces) - 1 else "") for i, p in enumerate(pieces)]


def _message(reply: Reply, message_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": MODEL_NAME,
        "content": content,
        "stop_reason": None if not content else reply.stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1 if not content else reply.output_tokens},
    }


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


async def _stream(reply: Reply, message_id: str) -> AsyncIterator[bytes]:
    yield _sse("message_start", {"type": "message_start", "message": _message(reply, message_id, [])})
    for index, block in enumerate(reply.blocks):
        kind = block["type"]
        if kind == "text":
            yield _block_start(index, {"type": "text", "text": ""})
            for piece in _chunks(block["text"]):
                if reply.chunk_pause:
                    await asyncio.sleep(reply.chunk_pause)
                yield _block_delta(index, {"type": "text_delta", "text": piece})
        elif kind == "thinking":
            yield _block_start(index, {"type": "thinking", "thinking": "", "signature": ""})
            yield _block_delta(index, {"type": "thinking_delta", "thinking": block["thinking"]})
            yield _block_delta(index, {"type": "signature_delta", "signature": block["signature"]})
        elif kind in ("tool_use", "server_tool_use"):
            yield _block_start(index, {**block, "input": {}})
            yield _block_delta(index, {"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
        else:
            yield _block_start(index, block)
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                                 "usage": {"output_tokens": reply.output_tokens}})
    yield _sse("message_stop", {"type": "message_stop"})


def _api_error(status: int) -> JSONResponse:
    kind, message = API_ERRORS.get(status, ("api_error", f"Scripted error {status}."))
    headers = {"retry-after": "1"} if status == 429 else {}
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def create_app() -> FastAPI:
    """Build the local model app. ``GET /local/requests`` tells tests what reached it."""
    app = FastAPI(title="Local model (not Claude)", docs_url=None, redoc_url=None)
    ids = itertools.count(1)
    seen: deque[dict[str, Any]] = deque(maxlen=200)
    app.state.requests_total = 0
    app.state.token_counts = 0

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        body = await request.json()
        reply = plan_reply(body)
        app.state.requests_total += 1
        seen.append({"seq": app.state.requests_total, "model": body.get("model"), "stream": bool(body.get("stream")),
                     "messages": body.get("messages", [])})
        logger.info("local model (not Claude) answering request %d", app.state.requests_total)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.error_status is not None:
            return _api_error(reply.error_status)
        message_id = f"msg_local_{next(ids)}"
        if body.get("stream"):
            return StreamingResponse(_stream(reply, message_id), media_type="text/event-stream")
        return _message(reply, message_id, reply.blocks)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, int]:
        body = await request.json()
        app.state.token_counts += 1
        return {"input_tokens": max(1, len(json.dumps(body.get("messages", []))) // 4)}

    @app.get("/local/requests")
    async def requests_seen(since: int = 0) -> dict[str, Any]:
        """How many ``/v1/messages`` requests arrived (``total``), the recent ones numbered
        above ``since``, and how many ``/v1/messages/count_tokens`` requests (``count_tokens``:
        the real API rate-limits those on their own, so the tests count them too)."""
        return {"total": app.state.requests_total, "recent": [r for r in seen if r["seq"] > since],
                "count_tokens": app.state.token_counts}

    @app.api_route("/{path:path}", methods=["GET", "POST", "HEAD", "PUT", "DELETE"])
    async def not_found(path: str) -> JSONResponse:
        error = {"type": "not_found_error", "message": f"/{path} is not served by the local model"}
        return JSONResponse({"type": "error", "error": error}, status_code=404)

    return app
