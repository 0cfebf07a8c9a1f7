"""What the worker sends to a request handler: `Start`, the chat events (`chat.Reasoning`,
`chat.Content`, `chat.ToolCall`), then `Done`, or `Failed` at any point; and the `Decoder` that
turns generated text into those chat events, applying the request's stop strings."""

import json
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .. import chat


@dataclass(frozen=True)
class Start:
    """The prompt is prefilled: `cached` of its `prompt_tokens` came from the cache."""

    prompt_tokens: int
    cached: int


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    cached: int
    completion_tokens: int
    stop_sequence: Optional[str] = None  # the stop string that ended the answer


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    param: Optional[str] = None
    code: Optional[str] = None


def sse(data: dict, event: Optional[str] = None) -> str:
    """One server-sent event."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could begin one of `stops`."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


class StopStrings:
    """Cuts text at the first stop string; text that could begin one is held back until it can't."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit: Optional[str] = None

    def feed(self, text: str) -> str:
        text, self.held = self.held + text, ""
        found = [(text.find(s), s) for s in self.stops if s in text]
        if found:
            at, self.hit = min(found)
            return text[:at]
        keep = held_back(text, self.stops)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Decoder:
    """Generated text -> chat events. `mode` None (a raw completion): all text is content; else
    `chat.OutputParser(mode)` splits reasoning, content and tool calls. Stop strings apply to the
    content; after one, nothing more comes out (`stopped`)."""

    def __init__(self, mode: Optional[str], stop: Sequence[str] = ()):
        self.parser = chat.OutputParser(mode) if mode else None
        self.stops = StopStrings(stop)

    @property
    def stopped(self) -> bool:
        return self.stops.hit is not None

    def feed(self, text: str) -> List[chat.Event]:
        if self.stopped:
            return []
        return self._filter(self.parser.feed(text) if self.parser else [chat.Content(text)])

    def finish(self) -> List[chat.Event]:
        if self.stopped:
            return []
        events = self._filter(self.parser.finish() if self.parser else [])
        return events if self.stopped else _append(events, self.stops.flush())

    def _filter(self, events: List[chat.Event]) -> List[chat.Event]:
        out: List[chat.Event] = []
        for event in events:
            if isinstance(event, chat.Content):
                _append(out, self.stops.feed(event.text))
                if self.stopped:
                    break
            else:  # held content was no stop string: it goes first
                _append(out, self.stops.flush())
                out.append(event)
        return out


def _append(events: List[chat.Event], text: str) -> List[chat.Event]:
    """Add content text, joining it to a content event at the end."""
    if text:
        if events and isinstance(events[-1], chat.Content):
            events[-1] = chat.Content(events[-1].text + text)
        else:
            events.append(chat.Content(text))
    return events
