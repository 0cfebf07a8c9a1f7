"""Generation: the Python API, mlx-lm compatibility, sessions, the CLI."""

import re
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ds4_mlx import Session, chat, commands, generate, load, stream_generate
from ds4_mlx.commands import Repl
from ds4_mlx.generate import ContextLengthError
from ds4_mlx.kvstore import KVStore

PROMPT = chat.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}], "chat")


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return load(chat_model_dir)


def _greedy_ids(model, tokenizer, prompt, n, **kwargs):
    return [r.token for r in stream_generate(model, tokenizer, prompt, n, **kwargs)]


def test_stream_generate_reports_like_mlx_lm(loaded):
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=12))
    assert [r.generation_tokens for r in responses] == list(range(1, 13))
    last = responses[-1]
    assert last.finish_reason == "length" and all(r.finish_reason is None for r in responses[:-1])
    assert last.prompt_tokens == len(tokenizer.encode(PROMPT, add_special_tokens=False))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert last.logprobs.shape == (model.args.vocab_size,)
    np.testing.assert_allclose(float(mx.logsumexp(last.logprobs)), 0.0, atol=1e-4)
    assert "".join(r.text for r in responses) == tokenizer.decode([r.token for r in responses])


def test_mlx_lm_loads_and_generates_the_same_tokens(loaded, chat_model_dir):
    model, tokenizer = loaded
    theirs_model, theirs_tokenizer = mlx_lm.load(str(chat_model_dir))
    assert type(theirs_model) is type(model)
    theirs = [r.token for r in mlx_lm.stream_generate(theirs_model, theirs_tokenizer, PROMPT, max_tokens=16)]
    assert theirs == _greedy_ids(model, tokenizer, PROMPT, 16)
    assert mlx_lm.generate(theirs_model, theirs_tokenizer, PROMPT, max_tokens=16) == generate(model, tokenizer, PROMPT, 16)


def test_sampling_options_and_logits_processors(loaded):
    model, tokenizer = loaded
    mx.random.seed(3)
    first = _greedy_ids(model, tokenizer, PROMPT, 8, sampler=make_sampler(1.0, top_k=5))
    mx.random.seed(3)
    again = _greedy_ids(model, tokenizer, PROMPT, 8, sampler=make_sampler(1.0, top_k=5))
    assert first == again
    banned = _greedy_ids(model, tokenizer, PROMPT, 8)[0]
    processors = make_logits_processors(logit_bias={banned: -1e9})
    assert _greedy_ids(model, tokenizer, PROMPT, 8, logits_processors=processors)[0] != banned


def test_a_session_reuses_its_cache_for_a_longer_prompt(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer)
    answer = generate(model, tokenizer, PROMPT, 10, session=session)
    follow_up = chat.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
                             {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}], "chat")
    assert follow_up.startswith(session.text)  # the model's answer rendered back identically
    second = list(stream_generate(model, tokenizer, follow_up, 10, session=session))
    assert session.reused == len(session.encode(PROMPT)) + 9  # all but the last sampled token
    fresh = [r.token for r in stream_generate(model, tokenizer, follow_up, 10)]
    assert [r.token for r in second] == fresh


def test_chunked_prefill_gives_the_same_tokens(loaded):
    model, tokenizer = loaded
    seen = []
    chunked = _greedy_ids(model, tokenizer, PROMPT, 10, prefill_step_size=4,
                          prompt_progress_callback=lambda done, total: seen.append((done, total)))
    assert chunked == _greedy_ids(model, tokenizer, PROMPT, 10)
    total = seen[-1][1]
    assert seen[-1][0] == total and len(seen) == -(-total // 4)


def test_context_is_enforced(loaded):
    model, tokenizer = loaded
    n = len(tokenizer.encode(PROMPT, add_special_tokens=False))
    with pytest.raises(ContextLengthError, match="context"):
        list(stream_generate(model, tokenizer, PROMPT, 5, session=Session(model, tokenizer, ctx=n)))
    responses = list(stream_generate(model, tokenizer, PROMPT, 50, session=Session(model, tokenizer, ctx=n + 3)))
    assert responses[-1].generation_tokens == 3 and responses[-1].finish_reason == "length"


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ds4_mlx.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_cli_generate_prints_only_the_text_on_stdout(chat_model_dir, loaded):
    model, tokenizer = loaded
    result = _cli("generate", "--model", str(chat_model_dir), "-p", "Hello there!", "--system", "Be brief.",
                  "--nothink", "--temp", "0", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = generate(model, tokenizer, PROMPT, 12)
    assert result.stdout == chat.parse(expected, "chat").content + "\n"
    assert "prompt:" in result.stderr and "generation: 12 tokens" in result.stderr


def test_cli_errors_are_clear(chat_model_dir, tmp_path):
    too_long = _cli("generate", "--model", str(chat_model_dir), "-p", "word " * 50, "--ctx", "20")
    assert too_long.returncode == 1 and "context is 20 tokens" in too_long.stderr and too_long.stdout == ""
    missing = _cli("generate", "--model", str(tmp_path), "-p", "hi")
    assert missing.returncode == 1 and "ds4-mlx convert" in missing.stderr
    both = _cli("generate", "--model", str(chat_model_dir), "-p", "hi", "--think", "--nothink")
    assert both.returncode != 0 and "choose one of" in both.stderr


def test_cli_chat_keeps_the_conversation(chat_model_dir):
    script = "Hello there!\n/nothink\nAnd then?\n/clear\n/unknown\n/quit\n"
    result = _cli("chat", "--model", str(chat_model_dir), "--temp", "0", "--max-tokens", "6", stdin=script)
    assert result.returncode == 0, result.stderr
    reports = [line for line in result.stderr.splitlines() if line.startswith("prompt:")]
    assert len(reports) == 2 and "/think /nothink" in result.stderr


LONG_SYSTEM = " ".join(f"Rule {i}: answer kindly." for i in range(120))  # about 800 tokens


def _restored(stderr: str) -> int:
    return int(re.search(r"\((\d+) restored from the disk cache\)", stderr).group(1))


def _prompt_tokens(stderr: str) -> int:
    return int(re.search(r"prompt: (\d+) tokens", stderr).group(1))


def test_cli_reuses_the_disk_cache_across_processes(chat_model_dir, tmp_path):
    base = ("generate", "--model", str(chat_model_dir), "--system", LONG_SYSTEM, "--nothink", "--temp", "0",
            "--max-tokens", "8")
    store = ("--kv-disk-dir", str(tmp_path / "kv"), "--kv-disk-space-mb", "256")
    runs = {}
    for name, extra, question in (("plain", (), "First?"), ("cold", store, "First?"), ("again", store, "First?"),
                                  ("other", store, "Second?"), ("other plain", (), "Second?")):
        runs[name] = _cli(*base, *extra, "-p", question)
        assert runs[name].returncode == 0, runs[name].stderr
    assert _restored(runs["cold"].stderr) == 0
    # the same prompt again: its whole prefill comes from the snapshot taken after it
    assert _restored(runs["again"].stderr) == _prompt_tokens(runs["again"].stderr)
    # another question after the same system prompt: the snapshot taken before the user turn
    shared = _restored(runs["other"].stderr)
    assert 512 <= shared < _prompt_tokens(runs["other"].stderr)
    # greedy output is the same with and without the store
    assert runs["plain"].stdout == runs["cold"].stdout == runs["again"].stdout
    assert runs["other"].stdout == runs["other plain"].stdout


def test_a_long_generation_is_snapshotted_and_resumes_exactly(loaded, tmp_path):
    model, tokenizer = loaded
    store = KVStore(tmp_path / "kv", 256, "test-model")
    first = Session(model, tokenizer, store=store, save_interval=16, min_save=8)
    tokens = _greedy_ids(model, tokenizer, PROMPT, 40, session=first)
    prompt = first.encode(PROMPT) + tokens[:30]
    second = Session(model, tokenizer, store=store)
    resumed = _greedy_ids(model, tokenizer, prompt, 10, session=second)
    assert second.restored > len(first.encode(PROMPT))  # a snapshot taken during the generation
    assert resumed == tokens[30:]


def test_chat_survives_an_interrupted_answer(loaded, monkeypatch):
    model, tokenizer = loaded
    repl = Repl(Session(model, tokenizer), "chat", None, 8, make_sampler(0.0), 2048)
    repl.ask("Hello there!")
    assert len(repl.turns) == 2
    real = commands.stream_generate

    def interrupted(*args, **kwargs):
        for n, response in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield response

    monkeypatch.setattr(commands, "stream_generate", interrupted)
    repl.ask("Tell me more.")
    assert len(repl.turns) == 2  # the interrupted turn is dropped
    monkeypatch.setattr(commands, "stream_generate", real)
    repl.ask("Something else?")
    expected = Session(model, tokenizer)
    prompt = chat.render(repl.turns[:2] + [{"role": "user", "content": "Something else?"}], "chat", drop_thinking=False)
    assert repl.turns[-1]["content"] == chat.parse(generate(model, tokenizer, prompt, 8, session=expected), "chat").content
