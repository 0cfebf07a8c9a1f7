"""The OpenAI API: `/v1/chat/completions` and `/v1/completions` requests (validated by pydantic,
unknown fields ignored) into worker `Request`s, and worker events into responses and SSE chunks."""

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import chat
from .request import EFFORTS, Request, Settings, given, thinking_mode
from .stream import Done, Failed, Start, sse

DONE = "data: [DONE]\n\n"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Part(Model):
    type: str
    text: Optional[str] = None


class Function(Model):
    name: str
    arguments: Union[str, dict]


class ToolCall(Model):
    id: str
    type: Literal["function"] = "function"
    function: Function


class Message(Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[Part], None] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None


def object_schema(schema: Optional[dict]) -> Optional[dict]:
    if schema is not None and schema.get("type", "object") != "object":
        raise ValueError(f"a tool's parameters must be a JSON Schema of type object, not {schema.get('type')!r}")
    return schema


class FunctionSchema(Model):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None

    @field_validator("parameters")
    @classmethod
    def check_parameters(cls, schema):
        return object_schema(schema)


class Tool(Model):
    type: Literal["function"]
    function: FunctionSchema


class Switch(Model):
    type: Literal["enabled", "disabled", "adaptive"]


class StreamOptions(Model):
    include_usage: Optional[bool] = None


class Sampling(Model):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None

    def request(self, endpoint: str, max_tokens: int, **fields) -> Request:
        """A worker request with these sampling options (those not given: `Request`'s defaults)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return Request(endpoint, max_tokens, seed=self.seed, stop=stop, **fields, **given(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[List[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    reasoning_effort: Optional[Literal[tuple(EFFORTS)]] = None
    thinking: Optional[Switch] = None

    def to_request(self, endpoint: str, settings: Settings) -> Request:
        tools = None if self.tool_choice == "none" else [t.model_dump(exclude_unset=True) for t in self.tools or ()]
        mode = thinking_mode(settings, self.reasoning_effort, self.thinking and self.thinking.type)
        return self.request(endpoint, self.max_completion_tokens or self.max_tokens or settings.max_tokens, mode=mode,
                            tools=tools or None, messages=[m.model_dump(exclude_unset=True) for m in self.messages])


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)

    def to_request(self, endpoint: str, settings: Settings) -> Request:
        return self.request(endpoint, self.max_tokens or settings.max_tokens, prompt=self.prompt)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached}}


def delta(event: chat.Event) -> dict:
    if isinstance(event, chat.Reasoning):
        return {"reasoning_content": event.text}
    if isinstance(event, chat.Content):
        return {"content": event.text}
    return {"tool_calls": [{"index": event.index, **event.to_openai()}]}


def chat_completion(meta: dict, events: list) -> dict:
    """The chat.completion object of a whole generation's events."""
    reasoning = "".join(e.text for e in events if isinstance(e, chat.Reasoning))
    content = "".join(e.text for e in events if isinstance(e, chat.Content))
    calls = [e.to_openai() for e in events if isinstance(e, chat.ToolCall)]
    message = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    done = events[-1]
    return {**meta, "object": "chat.completion", "usage": usage(done),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}]}


def text_completion(meta: dict, events: list) -> dict:
    done = events[-1]
    text = "".join(e.text for e in events if isinstance(e, chat.Content))
    return {**meta, "object": "text_completion", "usage": usage(done),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}]}


class ChatStream:
    """Worker events -> chat.completion.chunk SSE lines (`completions`: text_completion chunks)."""

    def __init__(self, meta: dict, include_usage: bool = False, completions: bool = False):
        self.meta, self.include_usage, self.completions = meta, include_usage, completions

    def feed(self, event) -> List[str]:
        if isinstance(event, Start):
            return [] if self.completions else [self.chunk({"role": "assistant", "content": ""})]
        if isinstance(event, Failed):
            return [sse(error_body(event.status, event.message, event.param, event.code)), DONE]
        if isinstance(event, Done):
            usage_chunk = [sse({**self.meta, "object": self.object, "choices": [], "usage": usage(event)})]
            return [self.chunk({}, event.finish_reason)] + (usage_chunk if self.include_usage else []) + [DONE]
        return [self.chunk(delta(event))]

    @property
    def object(self) -> str:
        return "text_completion" if self.completions else "chat.completion.chunk"

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> str:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"text": delta.get("content", "")} if self.completions else {"delta": delta})
        return sse({**self.meta, "object": self.object, "choices": [choice]})
