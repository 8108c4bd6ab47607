"""The SDK's messages as wire events (:mod:`hosting.wire`): the server's side of the format.

Clients parse wire events, never SDK messages, so an SDK upgrade cannot break
them; this is the one module that knows both. ``raw`` events (the SDK message
itself) are added only when a request opts in.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    ServerToolUseBlock,
    StreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from hosting.errors import ErrorCode
from hosting.wire import WireEvent, error_event

REDACTED = "[redacted]"


def classify_api_error(status: int | None) -> tuple[ErrorCode, bool]:
    """Map a model API status to an error code and whether retrying can help (for
    ``agent_error``, not the code's default: the model refused the request itself)."""
    if status == 429:
        return ErrorCode.RATE_LIMITED, True
    if status == 529:
        return ErrorCode.OVERLOADED, True
    if status is not None and status >= 500:
        return ErrorCode.MODEL_UNAVAILABLE, True
    if status in (401, 403):
        return ErrorCode.MODEL_AUTH_FAILED, False
    return ErrorCode.AGENT_ERROR, False


def _tool_result_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [item.get("text", "") for item in content if isinstance(item, dict) and item.get("type") == "text"]
    return "\n".join(parts) if parts else json.dumps(content)


class Redactor:
    """Replaces secrets (API keys, tokens) wherever they would leave the server."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


class TurnTranslator:
    """Turns one turn's SDK messages into wire events.

    Text and thinking arrive as streamed deltas (``StreamEvent``); the complete
    ``AssistantMessage`` that follows contributes only its tool calls, except
    for messages that were never streamed (the CLI's synthetic ones).
    """

    def __init__(self, redact: Redactor, *, include_raw: bool = False) -> None:
        self._redact = redact
        self._include_raw = include_raw
        self._streamed_messages: set[str] = set()
        self.result: ResultMessage | None = None

    def translate(self, message: Any) -> list[WireEvent]:
        events = self._translate(message)
        if self._include_raw:
            is_instance = dataclasses.is_dataclass(message) and not isinstance(message, type)
            raw = dataclasses.asdict(message) if is_instance else {"repr": repr(message)}
            events.insert(0, WireEvent("raw", {"sdk_type": type(message).__name__, "message": raw}))
        return [WireEvent(e.type, self._redact(e.data)) for e in events]

    def _translate(self, message: Any) -> list[WireEvent]:
        if isinstance(message, StreamEvent):
            return self._stream_event(message)
        if isinstance(message, AssistantMessage):
            return self._assistant(message)
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            return [
                WireEvent("tool_result", {
                    "tool_use_id": block.tool_use_id,
                    "content": _tool_result_text(block.content),
                    "is_error": bool(block.is_error),
                })
                for block in message.content
                if isinstance(block, ToolResultBlock)
            ]
        if isinstance(message, ResultMessage):
            self.result = message
            return self._result(message)
        return []

    def _stream_event(self, message: StreamEvent) -> list[WireEvent]:
        if message.parent_tool_use_id is not None:
            return []
        event = message.event
        if event.get("type") == "message_start":
            self._streamed_messages.add(event.get("message", {}).get("id", ""))
        elif event.get("type") == "content_block_delta":
            delta = event.get("delta", {})
            if delta.get("type") == "text_delta":
                return [WireEvent("text", {"text": delta.get("text", "")})]
            if delta.get("type") == "thinking_delta":
                return [WireEvent("thinking", {"text": delta.get("thinking", "")})]
        return []

    def _assistant(self, message: AssistantMessage) -> list[WireEvent]:
        if message.parent_tool_use_id is not None or message.error:
            return []
        streamed = message.message_id in self._streamed_messages
        events: list[WireEvent] = []
        for block in message.content:
            if isinstance(block, (ToolUseBlock, ServerToolUseBlock)):
                events.append(WireEvent("tool_use", {"id": block.id, "name": block.name, "input": block.input}))
            elif isinstance(block, TextBlock) and not streamed:
                events.append(WireEvent("text", {"text": block.text}))
            elif isinstance(block, ThinkingBlock) and not streamed:
                events.append(WireEvent("thinking", {"text": block.thinking}))
        return events

    def _result(self, message: ResultMessage) -> list[WireEvent]:
        events = [WireEvent("result", {
            "subtype": message.subtype,
            "is_error": message.is_error,
            "stop_reason": message.stop_reason,
            "text": message.result,
            "usage": message.usage or {},
            "total_cost_usd": message.total_cost_usd,
            "duration_ms": message.duration_ms,
            "duration_api_ms": message.duration_api_ms,
            "num_turns": message.num_turns,
        })]
        if message.is_error:
            events.append(self._result_error(message))
        return events

    @staticmethod
    def _result_error(message: ResultMessage) -> WireEvent:
        aborted = message.terminal_reason == "aborted_streaming"
        if aborted or (message.subtype == "error_during_execution" and not message.result):
            return error_event(ErrorCode.INTERRUPTED, "The turn was interrupted.")
        code, retryable = classify_api_error(message.api_error_status)
        return error_event(code, message.result or f"The agent run failed ({message.subtype}).", retryable=retryable)
