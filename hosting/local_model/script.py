"""Pure decision logic of the local model: request in, scripted reply out.

Tests script the model through directives embedded in the prompt text, so a
test that talks to the hosted server (and never to the model directly) can
still choose what the model does:

``[[tool:NAME {json}]]``  answer with a ``tool_use`` block (repeatable)
``[[think]]``             start the reply with a thinking block
``[[delay:S]]``           wait S seconds before the first byte
``[[slow:S]]``            wait S seconds between streamed chunks
``[[error:STATUS]]``      fail with an API error (429, 500, 529, ...)
``[[echo-request]]``      reply with every text the request carried

Recall rule, so resumed sessions are provable: "What value did I ask you to
remember?" is answered with X only if an earlier user turn in the same request
said "Remember this value: X".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_DIRECTIVE = re.compile(r"\[\[(tool|think|delay|slow|error|echo-request)(?::([^\]]*))?\]\]")
_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)
_REMEMBER = re.compile(r"Remember this value:\s*(\S+)", re.IGNORECASE)
_RECALL = re.compile(r"What value did I ask you to remember\?", re.IGNORECASE)

API_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Scripted invalid request."),
    401: ("authentication_error", "Scripted authentication failure."),
    429: ("rate_limit_error", "Scripted rate limit."),
    500: ("api_error", "Scripted internal server error."),
    529: ("overloaded_error", "Scripted overload."),
}


@dataclass
class Reply:
    """What the model answers: content blocks plus delivery instructions."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "end_turn"
    delay: float = 0.0
    chunk_pause: float = 0.0
    error_status: int | None = None
    input_tokens: int = 0

    @property
    def output_tokens(self) -> int:
        return max(1, sum(len(json.dumps(b)) for b in self.blocks) // 4)


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    for block in content or []:
        if block.get("type") == "text":
            out.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            out.extend(_texts(block.get("content")))
    return out


def _prompt_texts(content: Any) -> list[str]:
    """The user's own texts in a message, without the CLI's system reminders.

    Kept block by block: after a failed turn the CLI sends the next prompt in
    the same user message, and only the last block is the new prompt.
    """
    if isinstance(content, list) and any(b.get("type") == "tool_result" for b in content):
        return []
    cleaned = (_REMINDER.sub("", text).strip() for text in _texts(content))
    return [text for text in cleaned if text]


def _tool_results(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return [b for b in content if b.get("type") == "tool_result"]
    return []


def _tool_names(request: dict[str, Any]) -> dict[str, str]:
    """Tool ids of the assistant's tool_use blocks, mapped to tool names."""
    names: dict[str, str] = {}
    for message in request.get("messages", []):
        if message.get("role") == "assistant" and isinstance(message.get("content"), list):
            for block in message["content"]:
                if block.get("type") == "tool_use":
                    names[block["id"]] = block["name"]
    return names


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _web_search_reply(query: str) -> list[dict[str, Any]]:
    """Answer the CLI's inner web-search request with deterministic results."""
    slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-") or "query"
    results = [
        {
            "type": "web_search_result",
            "url": f"https://example.org/{slug}/{n}",
            "title": f"Local result {n} for {query}",
            "encrypted_content": "",
            "page_age": None,
        }
        for n in (1, 2)
    ]
    return [
        {"type": "server_tool_use", "id": "srvtoolu_local_1", "name": "web_search", "input": {"query": query}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_local_1", "content": results},
        _text(f"Found {len(results)} local results for {query!r}."),
    ]


def plan_reply(request: dict[str, Any]) -> Reply:
    """Decide the reply to one Messages API request. Deterministic."""
    messages = request.get("messages", [])
    all_text = "\n".join(t for m in messages for t in _texts(m.get("content")))
    reply = Reply(input_tokens=max(1, len(all_text) // 4))
    last = messages[-1] if messages else {"role": "user", "content": ""}
    prompts = [t for m in messages if m.get("role") == "user" for t in _prompt_texts(m.get("content"))]
    prompt = prompts[-1] if prompts else ""

    directives = [(m.group(1), m.group(2) or "") for m in _DIRECTIVE.finditer(prompt)]
    for name, arg in directives:
        if name == "delay":
            reply.delay = float(arg)
        elif name == "slow":
            reply.chunk_pause = float(arg)
    results = _tool_results(last.get("content"))

    if any(str(t.get("type", "")).startswith("web_search") for t in request.get("tools") or []):
        query = re.sub(r"^.*?query:\s*", "", prompt, flags=re.DOTALL).strip() or prompt
        reply.blocks = _web_search_reply(query)
        return reply

    if not results:
        for name, arg in directives:
            if name == "error":
                reply.error_status = int(arg)
                return reply

    if results:
        names = _tool_names(request)
        lines = []
        for result in results:
            status = "failed" if result.get("is_error") else "returned"
            body = _REMINDER.sub("", " ".join(_texts(result.get("content")))).strip()
            lines.append(f"Tool {names.get(result.get('tool_use_id', ''), '?')} {status}: {body}")
        reply.blocks = [_text("\n".join(lines))]
        return reply

    if any(name == "think" for name, _ in directives):
        reply.blocks.append({"type": "thinking", "thinking": f"Thinking about: {prompt}", "signature": "local"})

    tool_calls = [arg for name, arg in directives if name == "tool"]
    if tool_calls:
        for n, spec in enumerate(tool_calls, start=1):
            tool_name, _, raw_input = spec.strip().partition(" ")
            tool_input = json.loads(raw_input) if raw_input.strip() else {}
            reply.blocks.append({"type": "tool_use", "id": f"toolu_local_{n}", "name": tool_name, "input": tool_input})
        reply.stop_reason = "tool_use"
        return reply

    reply.blocks.append(_text(_answer(prompt, prompts[:-1], all_text, directives)))
    return reply


def _answer(prompt: str, earlier_prompts: list[str], all_text: str, directives: list[tuple[str, str]]) -> str:
    if any(name == "echo-request" for name, _ in directives):
        return f"Request text follows.\n{all_text}"
    remember = _REMEMBER.search(prompt)
    if remember:
        return f"Noted: I will remember {remember.group(1)}."
    if _RECALL.search(prompt):
        for earlier in reversed(earlier_prompts):
            found = _REMEMBER.search(earlier)
            if found:
                return f"You asked me to remember {found.group(1)}."
        return "You have not asked me to remember any value."
    clean = _DIRECTIVE.sub("", prompt).strip()
    return (
        f"Local model answer to: {clean}\n\n"
        "This reply comes from the offline local model, not Claude.\n\n"
        "## Sources\n- [Local model documentation](https://example.org/local-model)"
    )
