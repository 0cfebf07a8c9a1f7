"""`ds4-mlx server`: a real server process on loopback with the tiny chat model, driven by the
official openai and anthropic clients; unit tests of the worker, the streaming converters and
stop strings with handwritten DSML (a random model does not write DSML by itself)."""

import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest

from ds4_mlx import Session, chat, generate, load
from ds4_mlx.kvstore import KVStore
from ds4_mlx.server import worker as worker_module
from ds4_mlx.server.anthropic_api import MessageStream, message
from ds4_mlx.server.openai_api import ChatStream, chat_completion
from ds4_mlx.server.request import Request, Settings, thinking_mode
from ds4_mlx.server.stream import Decoder, Done, Failed, Start, StopStrings
from ds4_mlx.server.worker import Job, Worker

KEY = "test-key"
CTX = 1024
LONG_SYSTEM = " ".join(f"Rule {i}: answer kindly." for i in range(120))  # about 800 tokens


class Server:
    """`ds4-mlx server` in a subprocess on a free loopback port; its log goes to a file."""

    def __init__(self, model_dir: Path, log: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log_path = f"http://127.0.0.1:{port}", log
        command = [sys.executable, "-m", "ds4_mlx.cli", "server", "--model", str(model_dir), "--port", str(port), *args]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError(self.log())

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGINT) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def openai(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=KEY, max_retries=0)

    def post(self, path: str, body) -> httpx.Response:
        """`body`: JSON, or bytes sent as JSON."""
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        content = body if isinstance(body, bytes) else json.dumps(body)
        return httpx.post(self.url + path, headers=headers, content=content, timeout=60)


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    running = Server(chat_model_dir, tmp_path_factory.mktemp("server") / "log", "--ctx", str(CTX), "--api-key", KEY,
                     "--max-tokens", "7", "--model-id", "ds4-test")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return load(chat_model_dir)


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# The server process


def test_models_health_auth_and_no_cors_by_default(server):
    client = server.openai()
    assert [m.id for m in client.models.list().data] == ["ds4-test"]
    assert client.models.retrieve("ds4-test").context_length == CTX
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "ds4-test"
    with pytest.raises(openai.AuthenticationError):
        server.openai(key="wrong").models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    ok = httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY, "Origin": "http://example.com"})
    assert ok.status_code == 200 and "access-control-allow-origin" not in ok.headers


def test_chat_completion_is_the_greedy_answer(server, loaded):
    model, tokenizer = loaded
    response = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=6,
                                                        temperature=0, reasoning_effort="none")
    prompt = chat.render(HELLO, "chat")
    choice = response.choices[0]
    assert choice.message.content == chat.parse(generate(model, tokenizer, prompt, 6), "chat").content
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert response.usage.prompt_tokens == _count(tokenizer, prompt)
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6
    default = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, temperature=0)
    assert default.usage.completion_tokens == 7 and default.choices[0].message.content == ""  # --max-tokens; thinks
    assert default.choices[0].message.reasoning_content


def test_streamed_chat_reasons_and_reports_usage(server, loaded):
    _, tokenizer = loaded
    stream = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=5, stream=True,
                                                      stream_options={"include_usage": True}, seed=3)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning and not any(c.choices[0].delta.content for c in chunks[1:] if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 5
    assert usage.prompt_tokens == _count(tokenizer, chat.render(HELLO, "think"))
    plain = list(server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=2, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_completions_take_the_raw_prompt(server, loaded):
    model, tokenizer = loaded
    prompt = "The capital of France is"
    response = server.openai().completions.create(model="ds4-test", prompt=prompt, max_tokens=5, temperature=0)
    assert response.choices[0].text == generate(model, tokenizer, prompt, 5)
    assert response.usage.prompt_tokens == _count(tokenizer, prompt) and response.usage.completion_tokens == 5
    stream = list(server.openai().completions.create(model="ds4-test", prompt=prompt, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == response.choices[0].text
    assert stream[-1].usage.completion_tokens == 5


def test_messages_api(server, loaded):
    _, tokenizer = loaded
    client = server.anthropic()
    reply = client.messages.create(model="ds4-test", max_tokens=4, system="Be brief.", thinking={"type": "disabled"},
                                   messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}])
    assert [b.type for b in reply.content] == ["text"] and reply.stop_reason == "max_tokens"
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == _count(tokenizer, chat.render(HELLO, "chat"))
    assert usage.output_tokens == 4
    with client.messages.stream(model="ds4-test", max_tokens=4, system="Be brief.", messages=[HELLO[1]],
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert [b.type for b in final.content] == ["thinking"] and final.content[0].thinking
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 4


def test_a_longer_follow_up_reports_cached_tokens(server):
    client = server.openai()
    first = client.chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=6, temperature=0,
                                           reasoning_effort="none")
    follow_up = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="ds4-test", messages=follow_up, max_tokens=3, temperature=0,
                                            reasoning_effort="none")
    # all of the first prompt and answer but the last sampled token (it was never fed)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + 6 - 1
    again = client.chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=2, reasoning_effort="none")
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # a diverging prompt; no disk store here


def test_a_client_that_goes_away_stops_its_generation(server):
    body = {"messages": HELLO, "max_tokens": 400, "stream": True, "reasoning_effort": "none"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert sum(line.startswith("data:") for line, _ in zip(lines, range(6))) >= 3
    tic = time.monotonic()
    after = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=3)
    assert after.choices[0].finish_reason == "length" and time.monotonic() - tic < 10
    with pytest.raises(httpx.ReadTimeout):  # the same without streaming
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=1)
    after = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=3)
    assert after.choices[0].finish_reason == "length" and time.monotonic() - tic < 15
    stopped = re.findall(r"POST /v1/chat/completions: \d+ tokens in, \d+ cached, (\d+) out, .*, cancelled",
                         server.log())
    assert len(stopped) == 2 and all(int(n) < 100 for n in stopped)


def test_two_clients_are_both_served_and_health_answers_while_busy(server):
    results = {}

    def ask(name, tokens):
        results[name] = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=tokens,
                                                                 reasoning_effort="none")

    threads = [threading.Thread(target=ask, args=(name, tokens)) for name, tokens in (("long", 60), ("short", 4))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not httpx.get(server.url + "/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    tic = time.monotonic()
    health = httpx.get(server.url + "/health", timeout=5).json()
    assert time.monotonic() - tic < 1 and health["busy"]
    for thread in threads:
        thread.join(60)
    assert results["long"].usage.completion_tokens == 60 and results["short"].usage.completion_tokens == 4


BAD_OPENAI = [
    ("/v1/chat/completions", b'{"messages": [', None),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": HELLO, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "not a schema"}}]}, "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * CTX}]}, "messages"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "word " * CTX}, "prompt"),
]

BAD_ANTHROPIC = [
    (b"not json", "JSON"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 0, "messages": [HELLO[1]]}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "bogus"}]}]}, "messages[0].content[0]"),
    ({"messages": [HELLO[1]], "tools": [{"name": "f", "input_schema": []}]}, "tools[0].input_schema"),
    ({"messages": [{"role": "user", "content": "word " * CTX}]}, "context"),
]


def test_bad_input_is_a_400_naming_the_field_and_the_server_goes_on(server):
    for path, body, param in BAD_OPENAI:
        response = server.post(path, body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["type"] == "invalid_request_error", (body, error)
        assert error["param"] == param and error["message"], (body, error)
    assert "context_length_exceeded" == response.json()["error"]["code"]
    no_json = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": "hi"}),
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert no_json.status_code == 400 and "Content-Type: application/json" in no_json.json()["error"]["message"]
    for body, named in BAD_ANTHROPIC:
        response = server.post("/v1/messages", body)
        error = response.json()
        assert response.status_code == 400 and error["type"] == "error", (body, error)
        assert error["error"]["type"] == "invalid_request_error" and named in error["error"]["message"], (body, error)
    with pytest.raises(anthropic.BadRequestError):
        server.anthropic().messages.create(model="ds4-test", max_tokens=-1, messages=[HELLO[1]])
    good = server.openai().chat.completions.create(model="ds4-test", messages=HELLO, max_tokens=2)
    assert good.usage.completion_tokens == 2


def test_a_restarted_server_reuses_the_saved_prefix(chat_model_dir, tmp_path):
    args = ("--kv-disk-dir", str(tmp_path / "kv"), "--kv-disk-space-mb", "256", "--nothink", "--ctx", "4096")
    conversation = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "First?"}]
    first = Server(chat_model_dir, tmp_path / "log1", *args, "--cors")
    preflight = httpx.options(first.url + "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    answer = first.openai().chat.completions.create(model="m", messages=conversation, max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    saved = len(list((tmp_path / "kv").glob("*.kv")))
    assert first.stop(signal.SIGINT) == 0
    assert len(list((tmp_path / "kv").glob("*.kv"))) == saved + 1  # the live session, saved at shutdown
    second = Server(chat_model_dir, tmp_path / "log2", *args)
    try:
        client = second.openai()
        again = client.chat.completions.create(model="m", messages=conversation, max_tokens=4, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens
        assert again.choices[0].message.content == answer.choices[0].message.content
        follow_up = conversation + [{"role": "assistant", "content": answer.choices[0].message.content},
                                    {"role": "user", "content": "Second?"}]
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Elsewhere"}], max_tokens=1)
        later = client.chat.completions.create(model="m", messages=follow_up, max_tokens=2)
        assert later.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    finally:
        assert second.stop(signal.SIGTERM) == -signal.SIGTERM  # saved, then uvicorn re-raises the signal


# ---------------------------------------------------------------------------------------------
# Units: stop strings, the streaming converters, the thinking switch, the worker

CALL = ('<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">[1,2]</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>')
OUTPUT = ("Let me check the weather.</think>Checking."
          f"\n\n<｜DSML｜tool_calls>\n{CALL}\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")


def _pieces(text: str, size: int):
    return [text[i:i + size] for i in range(0, len(text), size)]


def _events(mode: str, text: str, size: int = 3, stop=()):
    decoder = Decoder(mode, stop)
    events = [e for piece in _pieces(text, size) for e in decoder.feed(piece)] + decoder.finish()
    return events, decoder


def test_stop_strings_are_held_back_and_cut():
    stops = StopStrings(["STOP", "\n\n"])
    assert [stops.feed(p) for p in ("Hel", "lo ST", "O", "P and more")] == ["Hel", "lo ", "", ""]
    assert stops.hit == "STOP" and stops.flush() == ""
    stops = StopStrings(["STOP"])
    assert stops.feed("a ST") == "a " and stops.flush() == "ST" and stops.hit is None
    for size in (1, 2, 5):
        events, decoder = _events("chat", "Answer: 42\n\nUser: more", size, stop=["\n\nUser:"])
        assert _joined(events) == [chat.Content("Answer: 42")] and decoder.stopped
        events, decoder = _events(None, "raw text, no end", size, stop=["never", "end."])
        assert _joined(events) == [chat.Content("raw text, no end")] and not decoder.stopped
        events, _ = _events("think", "thinking STOP</think>answer STOP here", size, stop=["STOP"])  # content only
        assert _joined(events) == [chat.Reasoning("thinking STOP"), chat.Content("answer ")]


def _joined(events):
    """Consecutive reasoning or content events as one."""
    return [kind("".join(e.text for e in group)) if kind in (chat.Reasoning, chat.Content) else next(group)
            for kind, group in itertools.groupby(events, type)]


@pytest.mark.parametrize("size", [1, 3, 7])
def test_openai_stream_of_a_tool_call_split_into_many_chunks(size):
    events, decoder = _events("think", OUTPUT, size)
    assert [kind for kind, _ in itertools.groupby(type(e) for e in events)] == [chat.Reasoning, chat.Content,
                                                                                  chat.ToolCall]
    call = next(e for e in events if isinstance(e, chat.ToolCall))
    assert decoder.parser.tool_call_dsml == {call.id: CALL}
    meta = {"id": "chatcmpl-1", "created": 0, "model": "m"}
    done = Done("tool_calls", 20, 5, 40)
    converter = ChatStream(meta, include_usage=True)
    lines = [line for event in [Start(20, 5), *events, done] for line in converter.feed(event)]
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me check the weather."
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls == [[{"index": 0, "id": call.id, "type": "function",
                       "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1,2]}'}}]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 40, "total_tokens": 60,
                                   "prompt_tokens_details": {"cached_tokens": 5}}
    whole = chat_completion(meta, [Start(20, 5), *events, done])
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Checking.",
                                              "reasoning_content": "Let me check the weather.",
                                              "tool_calls": [call.to_openai()]}
    error = ChatStream(meta).feed(Failed(500, "boom"))
    assert json.loads(error[0][len("data: "):])["error"]["message"] == "boom" and error[-1] == "data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 4])
def test_anthropic_events_of_a_tool_call_split_into_many_chunks(size):
    events, _ = _events("think", OUTPUT, size)
    call = next(e for e in events if isinstance(e, chat.ToolCall))
    meta = {"id": "msg_1", "model": "m"}
    stream = MessageStream(meta)
    lines = [line for event in [Start(20, 5), *events, Done("tool_calls", 20, 5, 40)] for line in stream.feed(event)]
    parsed = [(line.split("\n")[0][len("event: "):], json.loads(line.split("\n")[1][len("data: "):])) for line in lines]
    assert all(kind == data["type"] for kind, data in parsed)
    kinds = [kind for kind, _ in parsed]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [data["content_block"] for kind, data in parsed if kind == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    assert starts[2] == {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {}}
    assert kinds.count("content_block_stop") == 3
    deltas = [data["delta"] for kind, data in parsed if kind == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == "Let me check the weather."
    assert "".join(d.get("text", "") for d in deltas) == "Checking."
    assert json.loads("".join(d.get("partial_json", "") for d in deltas)) == {"city": "Paris", "days": [1, 2]}
    assert parsed[0][1]["message"]["usage"]["input_tokens"] == 15
    end = parsed[-2][1]
    assert end["delta"]["stop_reason"] == "tool_use" and end["usage"]["output_tokens"] == 40
    whole = message(meta, [Start(20, 5), *events, Done("tool_calls", 20, 5, 40)])
    assert [b["type"] for b in whole["content"]] == ["thinking", "text", "tool_use"]
    assert whole["content"][2]["input"] == {"city": "Paris", "days": [1, 2]} and whole["stop_reason"] == "tool_use"
    stopped = message(meta, [Start(3, 0), chat.Content("x"), Done("stop", 3, 0, 2, "END")])
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "END"


def test_thinking_switch():
    small, large = Settings("m", 32768, 100, "think"), Settings("m", 1 << 20, 100, "chat")
    assert thinking_mode(small) == "think" and thinking_mode(large) == "chat"
    assert [thinking_mode(large, effort) for effort in ("none", "low", "medium", "high", "max")] == \
        ["chat", "think", "think", "think", "think-max"]
    assert thinking_mode(small, "max") == "think"  # think-max needs a long context
    assert thinking_mode(large, thinking="enabled") == "think" and thinking_mode(small, "high", "disabled") == "chat"


def _serve(worker: Worker, request: Request):
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, (Done, Failed)):
            done.set()

    worker.submit(Job(request, emit))
    assert done.wait(60)
    return events


def test_the_worker_replays_the_exact_dsml_of_its_tool_calls(chat_model_dir, loaded, monkeypatch, tmp_path):
    tokenizer = loaded[1]
    store = KVStore(tmp_path / "kv", 64, "test")

    def session():  # loaded in the worker's thread: MLX streams are per thread
        return Session(*load(chat_model_dir), store=store, min_save=1)

    worker = Worker(session)
    worker.start()
    prompts, outputs, real = [], [OUTPUT, "It is sunny.</think>Sunny."], worker_module.stream_generate

    def fake(model, tokenizer, prompt, max_tokens, session, sampler, **kwargs):
        prompts.append(prompt)
        output = outputs.pop(0)
        for n, piece in enumerate(_pieces(output, 5), 1):
            yield SimpleNamespace(text=piece, prompt_tokens=10, generation_tokens=n, prompt_tps=1.0,
                                  generation_tps=1.0, finish_reason="stop" if 5 * n >= len(output) else None)

    monkeypatch.setattr(worker_module, "stream_generate", fake)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    asked = [{"role": "user", "content": "Weather?"}]
    events = _serve(worker, Request("test", 50, messages=asked, tools=tools, mode="think"))
    call = next(e for e in events if isinstance(e, chat.ToolCall))
    assert events[-1].finish_reason == "tool_calls"
    assert worker.memory.dsml == {call.id: CALL} and worker.session.extra["tool_call_dsml"] == {call.id: CALL}
    turn = {"role": "assistant", "content": "Checking.", "reasoning_content": "Let me check the weather.",
            "tool_calls": [call.to_openai()]}
    history = asked + [turn, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    _serve(worker, Request("test", 50, messages=history, tools=tools, mode="think"))
    assert CALL in prompts[-1] and '[1, 2]' not in prompts[-1]  # not the re-encoded JSON
    assert worker.session.extra["tool_call_dsml"] == {call.id: CALL}

    # saved with the snapshots, the map comes back to a new worker (a restarted server) that restores one
    monkeypatch.setattr(worker_module, "stream_generate", real)
    _serve(worker, Request("test", 1, messages=history, tools=tools, mode="think"))
    worker.close()
    exact = chat.render(history, "think", tools, tool_call_dsml={call.id: CALL})
    fresh = Worker(session)
    fresh.start()
    events = _serve(fresh, Request("test", 1, prompt=exact + "More"))  # a raw prompt: rendered without the map
    assert events[0].cached == _count(tokenizer, exact) and fresh.memory.dsml == {call.id: CALL}
    answered = history + [{"role": "assistant", "content": "Sunny.", "reasoning_content": "It is sunny."},
                          {"role": "user", "content": "Thanks!"}]
    events = _serve(fresh, Request("test", 1, messages=answered, tools=tools, mode="think"))
    assert events[0].cached == _count(tokenizer, exact)  # rendered with the exact DSML again
    fresh.close()

    # a server restarted again knows the DSML from the store at start, before any restore
    again = Worker(session)
    again.start()
    assert again.memory.dsml == {call.id: CALL}
    events = _serve(again, Request("test", 1, messages=answered, tools=tools, mode="think"))
    assert events[0].cached == _count(tokenizer, chat.render(answered, "think", tools, tool_call_dsml={call.id: CALL}))
    again.close()
