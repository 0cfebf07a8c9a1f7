"""What both APIs turn a request into, the thinking switch, and the server's settings."""

from dataclasses import dataclass, field
from typing import List, Optional

from ..chat import THINK_MAX_MIN_CONTEXT

# OpenAI `reasoning_effort` -> chat mode. Every level between none and max reasons at ds4's "high"
# (the model has no lighter reasoning mode); "max" adds the maximum-effort preamble.
EFFORTS = {"none": "chat", "minimal": "think", "low": "think", "medium": "think", "high": "think",
           "xhigh": "think", "max": "think-max"}


@dataclass(frozen=True)
class Settings:
    model_id: str
    ctx: int
    max_tokens: int  # for requests that give none
    mode: str  # thinking mode of requests that ask for none: "chat", "think" or "think-max"


@dataclass
class Request:
    """One generation for the worker: chat `messages` (and `tools`) rendered in `mode`, or a raw
    `prompt` (mode None: the output is not parsed)."""

    endpoint: str  # "POST /v1/chat/completions", for the log
    max_tokens: int
    messages: Optional[List[dict]] = None
    tools: Optional[List[dict]] = None
    mode: Optional[str] = None
    prompt: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)


def given(**values) -> dict:
    """The values that are not None."""
    return {key: value for key, value in values.items() if value is not None}


class APIError(Exception):
    """An error answered in the API's shape (OpenAI or Anthropic)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def thinking_mode(settings: Settings, effort: Optional[str] = None, thinking: Optional[str] = None) -> str:
    """The chat mode of a request: `thinking` ("enabled", "adaptive", "disabled") switches reasoning
    on or off, `effort` (a key of EFFORTS) picks the level; neither: the server's default. think-max
    below the context it needs falls back to think, as ds4 does."""
    if thinking == "disabled":
        mode = "chat"
    elif effort is not None:
        mode = EFFORTS[effort]
    else:
        mode = settings.mode if thinking is None else "think"
    return "think" if mode == "think-max" and settings.ctx < THINK_MAX_MIN_CONTEXT else mode
