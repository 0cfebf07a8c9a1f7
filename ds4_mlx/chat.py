"""The DeepSeek V4 chat format: render messages into a prompt, parse generated text back.

Rendering follows DeepSeek's reference encoder (`encoding/encoding_dsv4.py` and
`encoding/README.md` in deepseek-ai/DeepSeek-V4-Flash) byte for byte:

    <｜begin▁of▁sentence｜>[think-max preamble]{system}[\\n\\n## Tools ...]
    <｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>   (chat, or an earlier turn)
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}[tool calls]<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{result}</tool_result>\\n\\n<tool_result>...<｜Assistant｜><think>

Tool calls are DSML blocks; `string="true"` parameters hold raw strings, `string="false"` JSON:

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

Decisions beyond the reference:

- think-max below `THINK_MAX_MIN_CONTEXT` tokens of context (the model card asks for 384K) warns
  and still renders the think-max preamble: the caller asked for it and may know better; a CLI or
  server that wants ds4's behaviour (fall back to think) checks the context itself.
- Message text is not escaped. Text that spells a special token (say a user typing
  "<｜Assistant｜>") becomes that token when the prompt is tokenized, as with the reference encoder
  and ds4. A server that wants to defend against this has to clean untrusted text itself.
"""

import json
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

MODES = ("chat", "think", "think-max")
THINK_MAX_MIN_CONTEXT = 393216

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"

THINK_MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_TOOLS_PROMPT = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside {THINK}...{END_THINK} BEFORE any tool calls or final response.

Otherwise, output directly after {END_THINK} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# The DSML grammar, piece by piece.
_TOOL_CALLS = f"\n\n<{DSML}tool_calls"  # how a block starts in generated text
_BLOCK_OPEN = _TOOL_CALLS + ">\n"
_BLOCK_CLOSE = f"</{DSML}tool_calls>"
_INVOKE = f'<{DSML}invoke name="'
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM = f'<{DSML}parameter name="'
_PARAM_CLOSE = f"</{DSML}parameter>"


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text(content) -> str:
    """Message content as text: a string, None, or content parts (joined by blank lines)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n\n".join(
        p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
        for p in content
    )


# ----------------------------------------------------------------------------------------------
# Rendering


def encode_tool_call(name: str, arguments: Union[str, dict]) -> str:
    """The DSML invoke of one call, from OpenAI `function.arguments` (a JSON object string).

    Arguments that are not a JSON object become one string parameter named "arguments", as in the
    reference encoder.
    """
    try:
        args = arguments if isinstance(arguments, dict) else json.loads(arguments)
    except (TypeError, ValueError):
        args = None
    if not isinstance(args, dict):
        args = {"arguments": arguments}
    params = [
        f'{_PARAM}{key}" string="true">{value}{_PARAM_CLOSE}' if isinstance(value, str)
        else f'{_PARAM}{key}" string="false">{_json(value)}{_PARAM_CLOSE}'
        for key, value in args.items()
    ]
    return f'{_INVOKE}{name}">\n' + "\n".join(params) + f"\n{_INVOKE_CLOSE}"


def _tool_calls_block(tool_calls, tool_call_dsml: Dict[str, str]) -> str:
    if not tool_calls:
        return ""
    if all(call.get("id") in tool_call_dsml for call in tool_calls):
        invokes = [tool_call_dsml[call["id"]] for call in tool_calls]
    else:
        invokes = [
            encode_tool_call(call["function"]["name"], call["function"]["arguments"])
            for call in tool_calls
        ]
    return _BLOCK_OPEN + "\n".join(invokes) + "\n" + _BLOCK_CLOSE


def _tools_section(message) -> str:
    tools = message.get("tools")
    if not tools:
        return ""
    schemas = "\n".join(_json(tool.get("function", tool)) for tool in tools)
    return "\n\n" + _TOOLS_PROMPT.format(schemas=schemas)


def _merge_tool_results(messages) -> List[dict]:
    """Copies of the messages with tool results merged into user turns, as the reference does.

    Consecutive user and tool messages become one user turn of blocks ("text", str) and
    ("tool", tool_call_id, str); tool results are then put in the order of the calls of the
    latest assistant turn that made calls (unknown ids sort first, stably).
    """
    merged = []
    for message in messages:
        role = message.get("role")
        if role in ("user", "tool"):
            content = _text(message.get("content"))
            if role == "user":
                block = ("text", content)
            else:
                block = ("tool", message.get("tool_call_id"), content)
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role in ("system", "developer", "assistant", "latest_reminder"):
            merged.append(dict(message))
        else:
            raise ValueError(f"unknown message role {role!r}")

    order = {}
    for message in merged:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            order = {call["id"]: i for i, call in enumerate(calls) if call.get("id")}
        elif message["role"] == "user":
            results = iter(sorted((b for b in message["blocks"] if b[0] == "tool"),
                                  key=lambda b: order.get(b[1], 0)))
            message["blocks"] = [next(results) if b[0] == "tool" else b for b in message["blocks"]]
    return merged


def _last_user_index(messages) -> int:
    users = [i for i, m in enumerate(messages) if m["role"] in ("user", "developer")]
    return users[-1] if users else -1


def _render_message(message, keep_reasoning: bool, tool_call_dsml: Dict[str, str]) -> str:
    role = message["role"]
    if role == "system":
        return _text(message.get("content")) + _tools_section(message)
    if role == "developer":
        return USER + _text(message.get("content")) + _tools_section(message)
    if role == "latest_reminder":
        return LATEST_REMINDER + _text(message.get("content"))
    if role == "user":
        return USER + "\n\n".join(
            b[1] if b[0] == "text" else f"<tool_result>{b[2]}</tool_result>"
            for b in message["blocks"]
        )
    reasoning = _text(message.get("reasoning_content")) + END_THINK if keep_reasoning else ""
    return (reasoning + _text(message.get("content"))
            + _tool_calls_block(message.get("tool_calls"), tool_call_dsml) + EOS)


def render(
    messages: List[dict],
    mode: str = "chat",
    tools: Optional[List[dict]] = None,
    *,
    add_generation_prompt: bool = True,
    drop_thinking: bool = True,
    context: Optional[int] = None,
    tool_call_dsml: Optional[Dict[str, str]] = None,
) -> str:
    """The prompt text (starting with the BOS text) for OpenAI-style `messages`.

    Roles: system, developer (rendered as a user turn), user, assistant (`content`,
    `reasoning_content`, OpenAI `tool_calls`), tool (`tool_call_id`, `content`; merged into the
    next user turn) and latest_reminder. Content is a string or a list of text parts.

    mode: "chat" (no reasoning), "think" or "think-max" (the prompt ends with `<think>`).
    tools: OpenAI function schemas, rendered into the first message if it is a system message,
        else into an empty system message put first. A message may also carry its own "tools"
        (the reference's way, e.g. on a developer turn).
    add_generation_prompt: end a trailing user turn with `<｜Assistant｜>` and the mode marker.
    drop_thinking: in think modes, drop the reasoning of turns before the last user turn (and
        developer turns before it) unless any tools are present, as the reference does.
    context: the context size the prompt will run in; think-max below THINK_MAX_MIN_CONTEXT warns
        (and still renders think-max).
    tool_call_dsml: tool call id -> the DSML invoke the model sampled for it
        (`OutputParser.tool_call_dsml`); an assistant turn whose calls are all in it replays those
        bytes instead of re-encoding the JSON arguments.

    Kept from the reference as they are: consecutive user (and tool) messages join into one turn
    with blank lines between them; system messages are written back to back with no separator;
    a user turn followed by a latest_reminder gets `<｜Assistant｜>` and the marker before it.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "think-max" and context is not None and context < THINK_MAX_MIN_CONTEXT:
        warnings.warn(
            f"think-max asks for a context of at least {THINK_MAX_MIN_CONTEXT} tokens "
            f"(the model card's 384K); this one has {context}. Rendering think-max anyway.",
            stacklevel=2,
        )
    thinking = mode != "chat"
    msgs = _merge_tool_results(messages)
    if tools:
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["tools"] = [*msgs[0].get("tools", []), *tools]
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": tools})
    drop_thinking = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking and drop_thinking:
        last_user = _last_user_index(msgs)
        msgs = [m for i, m in enumerate(msgs) if m["role"] != "developer" or i >= last_user]
    last_user = _last_user_index(msgs)

    parts = [BOS, THINK_MAX_PREAMBLE if mode == "think-max" and msgs else ""]
    for i, message in enumerate(msgs):
        parts.append(_render_message(message, thinking and (not drop_thinking or i > last_user),
                                     tool_call_dsml or {}))
        following = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if (message["role"] in ("user", "developer")
                and following in ("assistant", "latest_reminder", None)
                and (following or add_generation_prompt)):
            opens_thinking = thinking and (not drop_thinking or i >= last_user)
            parts.append(ASSISTANT + (THINK if opens_thinking else END_THINK))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class Reasoning:
    """A piece of reasoning text (OpenAI `delta.reasoning_content`, Anthropic `thinking_delta`)."""

    text: str


@dataclass(frozen=True)
class Content:
    """A piece of answer text (OpenAI `delta.content`, Anthropic `text_delta`)."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call (OpenAI `delta.tool_calls[index]`, an Anthropic `tool_use` block).

    `arguments` is a JSON object string, decoded from DSML exactly as the reference decoder does.
    """

    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = Union[Reasoning, Content, ToolCall]


def new_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class _NeedMore(Exception):
    """The text ends inside a block that may still turn out valid."""


class _Invalid(Exception):
    """The text is not a valid tool-call block."""


def _literal(text: str, pos: int, *options: str):
    """(option, end) for the option that `text` has at `pos`."""
    for option in options:
        if text.startswith(option, pos):
            return option, pos + len(option)
    if any(option.startswith(text[pos:]) for option in options):
        raise _NeedMore
    raise _Invalid


def _until(text: str, pos: int, end: str, single_line: bool = False):
    """(the text up to `end`, the position after `end`)."""
    at = text.find(end, pos)
    newline = text.find("\n", pos, None if at < 0 else at)
    if single_line and newline >= 0:
        raise _Invalid
    if at < 0:
        raise _NeedMore
    return text[pos:at], at + len(end)


def _parse_block(text: str):
    """([(name, arguments, invoke DSML)], end) for the tool-call block at the start of `text`."""
    _, pos = _literal(text, 0, _BLOCK_OPEN)
    calls = []
    while True:
        tag, pos = _literal(text, pos, _INVOKE, _BLOCK_CLOSE)
        if tag == _BLOCK_CLOSE:
            if not calls:
                raise _Invalid
            return calls, pos
        start = pos - len(_INVOKE)
        name, pos = _until(text, pos, '">\n', single_line=True)
        args = {}
        while True:
            closes = (_INVOKE_CLOSE + "\n",) + (() if args else ("\n" + _INVOKE_CLOSE + "\n",))
            tag, pos = _literal(text, pos, _PARAM, *closes)
            if tag != _PARAM:
                break
            key, pos = _until(text, pos, '" string="', single_line=True)
            kind, pos = _literal(text, pos, 'true">', 'false">')
            value, pos = _until(text, pos, _PARAM_CLOSE)
            _, pos = _literal(text, pos, "\n")
            if key in args:
                raise _Invalid
            args[key] = _json(value) if kind == 'true">' else value
        arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in args.items()) + "}"
        calls.append((name, arguments, text[start:pos - 1]))


def _held_back(text: str, stops) -> int:
    """Length of the longest end of `text` that could begin one of `stops`."""
    ends = [n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])]
    return max(ends, default=0)


class OutputParser:
    """Streaming parser of generated text into `Reasoning`, `Content` and `ToolCall` events.

    In think modes the text starts inside the reasoning (the prompt ends with `<think>`) until
    `</think>`; in chat mode it is content. A DSML tool-call block (also one that starts inside
    the reasoning, which then ends) is held back until it closes and then yields one `ToolCall`
    per invoke; text that could still be the start of a block is held back too, so no part of a
    block is ever shown as text. Text after the end-of-sentence token is ignored.

    Blocks must have the reference's framing (what the model is trained to write); parameter
    values are decoded to `arguments` exactly as the reference decoder does. A block that turns
    out invalid, or is unfinished at `finish()`, is not lost: it is text of the channel it
    interrupted. Text after a block is content again.

    `tool_call_dsml` maps each call id to the exact DSML of its invoke, for
    `render(..., tool_call_dsml=...)`: the replayed turn is the generated text byte for byte,
    except when the model left out `</think>` or wrote text after its block.
    """

    def __init__(self, mode: str = "chat", id_factory: Callable[[], str] = new_tool_call_id):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._channel = Content if mode == "chat" else Reasoning
        self._new_id = id_factory
        self._text = ""
        self._in_block = False
        self._done = False
        self.tool_call_dsml: Dict[str, str] = {}

    def feed(self, text: str) -> List[Event]:
        if not self._done:
            self._text += text
        return self._parse(final=False)

    def finish(self) -> List[Event]:
        return self._parse(final=True)

    def _emit(self, events: List[Event], kind, text: str):
        if not text:
            return
        if events and type(events[-1]) is kind:
            events[-1] = kind(events[-1].text + text)
        else:
            events.append(kind(text))

    def _parse(self, final: bool) -> List[Event]:
        events = []
        while self._text and not self._done:
            if self._in_block:
                try:
                    calls, end = _parse_block(self._text)
                except _NeedMore:
                    if not final:
                        break
                    calls = None
                except _Invalid:
                    calls = None
                self._in_block = False
                if calls is None:  # not a block: its opening is plain text, scan on after it
                    self._emit(events, self._channel, _TOOL_CALLS)
                    self._text = self._text[len(_TOOL_CALLS):]
                    continue
                for name, arguments, dsml in calls:
                    call = ToolCall(len(self.tool_call_dsml), self._new_id(), name, arguments)
                    self.tool_call_dsml[call.id] = dsml
                    events.append(call)
                self._text = self._text[end:]
                self._channel = Content
                continue

            stops = (_TOOL_CALLS, EOS) + ((END_THINK,) if self._channel is Reasoning else ())
            at, stop = min(((self._text.find(s), s) for s in stops if s in self._text),
                           default=(None, None))
            if stop is None:
                keep = 0 if final else _held_back(self._text, stops)
                self._emit(events, self._channel, self._text[:len(self._text) - keep])
                self._text = self._text[len(self._text) - keep:]
                break
            self._emit(events, self._channel, self._text[:at])
            if stop == _TOOL_CALLS:
                self._text = self._text[at:]
                self._in_block = True
            elif stop == END_THINK:
                self._text = self._text[at + len(stop):]
                self._channel = Content
            else:
                self._text = ""
                self._done = True
        return events


# ----------------------------------------------------------------------------------------------
# Whole outputs


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: List[dict] = field(default_factory=list)  # OpenAI tool_calls
    tool_call_dsml: Dict[str, str] = field(default_factory=dict)

    def to_message(self) -> dict:
        """The OpenAI assistant message, ready to go back into `render`."""
        message = {"role": "assistant", "content": self.content,
                   "reasoning_content": self.reasoning}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def parse(text: str, mode: str = "chat",
          id_factory: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
    """Reasoning, content and tool calls of a whole generated text."""
    parser = OutputParser(mode, id_factory)
    out = ParsedOutput(tool_call_dsml=parser.tool_call_dsml)
    for event in parser.feed(text) + parser.finish():
        if isinstance(event, ToolCall):
            out.tool_calls.append(event.to_openai())
        elif isinstance(event, Reasoning):
            out.reasoning += event.text
        else:
            out.content += event.text
    return out


def finish_reason(tool_calls, truncated: bool = False) -> str:
    """OpenAI finish_reason: "tool_calls" if the output called tools, else "length" or "stop"."""
    if tool_calls:
        return "tool_calls"
    return "length" if truncated else "stop"
