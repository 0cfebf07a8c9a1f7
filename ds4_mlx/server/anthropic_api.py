"""The Anthropic API: `/v1/messages` requests into worker `Request`s (content blocks into the
OpenAI-style messages `chat.render` takes), and worker events into a message or its SSE events.

Usage follows Anthropic's meaning: `input_tokens` are the prompt tokens that were not in the
cache, `cache_read_input_tokens` those that were."""

import json
from typing import Annotated, List, Literal, Optional, Union

from pydantic import Field, field_validator

from .. import chat
from .openai_api import Model, object_schema
from .request import Request, Settings, given, thinking_mode
from .stream import Done, Failed, Start, sse

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               503: "overloaded_error"}


class Text(Model):
    type: Literal["text"]
    text: str


class Media(Model):  # rendered as "[Unsupported image]"
    type: Literal["image", "document"]


class Thinking(Model):
    type: Literal["thinking"]
    thinking: str


class RedactedThinking(Model):
    type: Literal["redacted_thinking"]


class ToolUse(Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class ToolResult(Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, List[Annotated[Union[Text, Media], Field(discriminator="type")]], None] = None


Block = Annotated[Union[Text, Media, Thinking, RedactedThinking, ToolUse, ToolResult], Field(discriminator="type")]


class Message(Model):
    role: Literal["user", "assistant"]
    content: Union[str, List[Block]]


class Tool(Model):
    name: str
    description: Optional[str] = None
    input_schema: dict

    @field_validator("input_schema")
    @classmethod
    def check_schema(cls, schema):
        return object_schema(schema)


class ToolChoice(Model):
    type: Literal["auto", "any", "tool", "none"]


class Switch(Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = None


class MessagesRequest(Model):
    model: Optional[str] = None
    messages: List[Message] = Field(min_length=1)
    system: Union[str, List[Text], None] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    stop_sequences: Optional[List[str]] = None
    stream: Optional[bool] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Switch] = None

    def to_request(self, endpoint: str, settings: Settings) -> Request:
        tools = None
        if self.tools and not (self.tool_choice and self.tool_choice.type == "none"):
            tools = [{"name": t.name, **({"description": t.description} if t.description is not None else {}),
                      "parameters": t.input_schema} for t in self.tools]
        return Request(endpoint, self.max_tokens or settings.max_tokens, messages=self.openai_messages(),
                       tools=tools, mode=thinking_mode(settings, thinking=self.thinking and self.thinking.type),
                       stop=self.stop_sequences or [],
                       **given(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k))

    def openai_messages(self) -> List[dict]:
        system = [] if self.system is None else [{"role": "system", "content": _parts(self.system)}]
        messages = []
        for message in self.messages:
            if isinstance(message.content, str):
                messages.append({"role": message.role, "content": message.content})
            elif message.role == "assistant":
                messages.append(_assistant(message.content))
            else:
                messages += [_user(block) for block in message.content]
        return system + messages


def _parts(content) -> Union[str, List[dict]]:
    return content if isinstance(content, str) else [block.model_dump() for block in content or ()]


def _user(block) -> dict:
    if isinstance(block, ToolResult):
        return {"role": "tool", "tool_call_id": block.tool_use_id, "content": _parts(block.content)}
    return {"role": "user", "content": [block.model_dump()]}


def _assistant(blocks) -> dict:
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
             for b in blocks if isinstance(b, ToolUse)]
    message = {"role": "assistant", "content": "".join(b.text for b in blocks if isinstance(b, Text)),
               "reasoning_content": "".join(b.thinking for b in blocks if isinstance(b, Thinking))}
    return {**message, "tool_calls": calls} if calls else message


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": output_tokens}


def stop(done: Done) -> dict:
    reason = "stop_sequence" if done.stop_sequence is not None and done.finish_reason == "stop" else None
    return {"stop_reason": reason or STOP_REASONS.get(done.finish_reason, "end_turn"),
            "stop_sequence": done.stop_sequence if reason else None}


def _tool_use(call: chat.ToolCall, arguments: bool = True) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments) if arguments else {}}


def message(meta: dict, events: list) -> dict:
    """The message object of a whole generation's events."""
    blocks = []
    for event in events:
        if isinstance(event, chat.ToolCall):
            blocks.append(_tool_use(event))
        elif isinstance(event, (chat.Reasoning, chat.Content)):
            kind = "thinking" if isinstance(event, chat.Reasoning) else "text"
            if blocks and blocks[-1]["type"] == kind:
                blocks[-1][kind] += event.text
            else:
                blocks.append({"type": kind, kind: event.text, **({"signature": ""} if kind == "thinking" else {})})
    done = events[-1]
    return {**meta, "type": "message", "role": "assistant", "content": blocks, **stop(done),
            "usage": usage(done.prompt_tokens, done.cached, done.completion_tokens)}


class MessageStream:
    """Worker events -> Anthropic SSE events: message_start, content blocks (thinking, text,
    tool_use) with their deltas, message_delta, message_stop."""

    def __init__(self, meta: dict):
        self.meta, self.index, self.open = meta, -1, None

    def feed(self, event) -> List[str]:
        if isinstance(event, Start):
            start = {**self.meta, "type": "message", "role": "assistant", "content": [], "stop_reason": None,
                     "stop_sequence": None, "usage": usage(event.prompt_tokens, event.cached, 0)}
            return [self.event("message_start", message=start)]
        if isinstance(event, Failed):
            return [sse(error_body(event.status, event.message), "error")]
        if isinstance(event, Done):
            return self.close() + [
                self.event("message_delta", delta=stop(event),
                           usage=usage(event.prompt_tokens, event.cached, event.completion_tokens)),
                self.event("message_stop")]
        if isinstance(event, chat.ToolCall):
            partial = {"type": "input_json_delta", "partial_json": event.arguments}
            return (self.block("tool_use", _tool_use(event, arguments=False)) + [self.delta(partial)]
                    + self.close())
        if isinstance(event, chat.Reasoning):
            return self.block("thinking", {"type": "thinking", "thinking": "", "signature": ""}) + [
                self.delta({"type": "thinking_delta", "thinking": event.text})]
        return self.block("text", {"type": "text", "text": ""}) + [self.delta({"type": "text_delta", "text": event.text})]

    def event(self, kind: str, **data) -> str:
        return sse({"type": kind, **data}, kind)

    def delta(self, delta: dict) -> str:
        return self.event("content_block_delta", index=self.index, delta=delta)

    def block(self, kind: str, start: dict) -> List[str]:
        """Open a block of `kind` unless one is open (a tool_use block is always new)."""
        if self.open == kind and kind != "tool_use":
            return []
        out = self.close()
        self.index, self.open = self.index + 1, kind
        return out + [self.event("content_block_start", index=self.index, content_block=start)]

    def close(self) -> List[str]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", index=self.index)]
