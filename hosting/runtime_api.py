"""Dari's custom runtime protocol (``dari-runtime-v1``): the advance request and the state.

Shared by the server, which runs an advance, and the gateway, which validates it
before it routes (a bad request never reaches a sandbox), like :mod:`hosting.contract`
for the message routes.

Request: ``{"input": {"type": "user_message", "message": {"content": [blocks]}},
"state_ref": {"json": state}}``; answer: ``{"text": ..., "state": state}``, where the
state is ``{"session_id": ..., "turns": N}``: the public session id and how many turns
the conversation has had. Text blocks are joined into the prompt; other blocks (files,
images) are refused with 422 until the agent can take them.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from hosting.contract import jsonable_errors, validate_session_id
from hosting.errors import ErrorCode, HostingError

ADVANCE_PATH = "/runtime/advance"

class State(BaseModel):
    """What the caller keeps between advances."""

    model_config = ConfigDict(extra="forbid")

    session_id: StrictStr
    turns: StrictInt = Field(ge=0)

    @field_validator("session_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return validate_session_id(value)


class StateRef(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    state: State | None = Field(default=None, alias="json")


class Message(BaseModel):
    content: list[dict[str, Any]] = Field(min_length=1)


class AdvanceInput(BaseModel):
    type: Literal["user_message"]
    message: Message


class AdvanceRequest(BaseModel):
    """Body of ``POST /runtime/advance``."""

    model_config = ConfigDict(extra="forbid")

    input: AdvanceInput
    state_ref: StateRef | None = None

    @property
    def state(self) -> State | None:
        return self.state_ref.state if self.state_ref is not None else None

    @property
    def prompt(self) -> str:
        return _prompt(self.input.message.content)


def _prompt(blocks: list[dict[str, Any]]) -> str:
    texts = []
    for index, block in enumerate(blocks):
        kind = block.get("type")
        if kind != "text":
            raise HostingError(f"content block {index} has type {kind!r}: only text blocks are supported "
                               "(files and images are not yet)", code=ErrorCode.INVALID_REQUEST)
        text = block.get("text")
        if not isinstance(text, str):
            raise HostingError(f"content block {index}: text must be a string", code=ErrorCode.INVALID_REQUEST)
        texts.append(text)
    prompt = "\n\n".join(texts)
    if not prompt.strip():
        raise HostingError("the message has no text", code=ErrorCode.INVALID_REQUEST)
    return prompt


async def advance_body(request: Request) -> tuple[AdvanceRequest, str]:
    """Validate an advance: 415 not JSON, 400 malformed or not an object, 422 bad fields
    or blocks. Returns the request and its prompt."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HostingError("Content-Type must be application/json", code=ErrorCode.UNSUPPORTED_MEDIA_TYPE)
    try:
        payload = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HostingError(f"body is not valid JSON: {exc}", code=ErrorCode.BAD_REQUEST) from None
    if not isinstance(payload, dict):
        raise HostingError('body must be a JSON object like {"input": {...}, "state_ref": {"json": {...}}}',
                           code=ErrorCode.BAD_REQUEST)
    try:
        advance = AdvanceRequest.model_validate(payload)
    except ValidationError as exc:
        raise HostingError(jsonable_errors(exc.errors()), code=ErrorCode.INVALID_REQUEST) from None
    return advance, advance.prompt


def new_session_id() -> str:
    return f"dari-{secrets.token_hex(12)}"
