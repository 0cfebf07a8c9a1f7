"""The `ds4-mlx generate` and `ds4-mlx chat` commands.

The model's text goes to stdout (reasoning dimmed on a terminal), everything else (progress,
warnings, statistics) to stderr, so `ds4-mlx generate ... > out.txt` captures only the text.
"""

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import mlx.core as mx
import typer
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

from . import chat
from .generate import ContextLengthError, Session, stream_generate
from .kvstore import KVStore, model_fingerprint
from .utils import load

DIM, RESET = "\x1b[2m", "\x1b[0m"

ModelDir = Annotated[Path, typer.Option("--model", "-m", help="Converted model directory (ds4-mlx convert).")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate per answer.")]
Temp = Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature (0: greedy).")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off).")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k best tokens (0: off).")]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the best one's probability.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
Ctx = Annotated[int, typer.Option("--ctx", min=2, help="Context length: prompts must fit, generation stops at it.")]
KVDir = Annotated[Optional[Path], typer.Option("--kv-disk-dir", help="Keep KV cache snapshots here and reuse them.")]
KVSpace = Annotated[float, typer.Option("--kv-disk-space-mb", min=1.0, help="Disk budget of --kv-disk-dir in MB.")]
PrefillStep = Annotated[int, typer.Option("--prefill-step", min=1, help="Tokens per prefill chunk.")]
System = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
NoThink = Annotated[bool, typer.Option("--nothink", help="Answer without reasoning.")]
Think = Annotated[bool, typer.Option("--think", help="Reason before answering (the default).")]
ThinkMax = Annotated[bool, typer.Option("--think-max", help="Reason at maximum effort (meant for --ctx >= 393216).")]


def mode_from_flags(nothink: bool, think: bool, think_max: bool) -> str:
    if nothink + think + think_max > 1:
        raise typer.BadParameter("choose one of --nothink, --think, --think-max")
    return "chat" if nothink else "think-max" if think_max else "think"


def open_session(model_dir: Path, ctx: int, kv_disk_dir: Optional[Path], kv_disk_space_mb: float,
                 seed: Optional[int]) -> Session:
    try:
        model, tokenizer = load(model_dir)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    store = None
    if kv_disk_dir is not None:
        store = KVStore(kv_disk_dir, kv_disk_space_mb, model_fingerprint(model_dir))
    if seed is not None:
        mx.random.seed(seed)
    return Session(model, tokenizer, ctx=ctx, store=store)


class Printer:
    """Shows parsed output as it streams: reasoning (dimmed on a terminal), content, tool calls."""

    def __init__(self, mode: str):
        self.parser = chat.OutputParser(mode)
        self.dim = sys.stdout.isatty()
        self.in_reasoning = False
        self.content: List[str] = []
        self.reasoning: List[str] = []

    def feed(self, text: str):
        self._show(self.parser.feed(text))

    def finish(self):
        self._show(self.parser.finish())
        self._dim(False)
        if self.reasoning or self.content:
            sys.stdout.write("\n")
        sys.stdout.flush()

    def _show(self, events):
        for event in events:
            if isinstance(event, chat.Reasoning):
                self._dim(True)
                self.reasoning.append(event.text)
                sys.stdout.write(event.text)
            elif isinstance(event, chat.Content):
                self._dim(False)
                self.content.append(event.text)
                sys.stdout.write(event.text)
            else:
                self._dim(False)
                sys.stdout.write(f"\n[tool call {event.name}] {event.arguments}\n")
        sys.stdout.flush()

    def _dim(self, on: bool):
        if self.dim and on != self.in_reasoning:
            sys.stdout.write(DIM if on else RESET)
        self.in_reasoning = on


def _answer(session: Session, prompt: str, mode: str, max_tokens: int, sampler, prefill_step: int):
    """Generate and show one answer to a rendered prompt; returns (printer, last response)."""
    printer, response, bars = Printer(mode), None, []

    def progress(done, total):
        if total > prefill_step:
            if not bars:
                bars.append(tqdm(total=total, unit="tok", desc="prefill", file=sys.stderr, leave=False))
            bars[0].update(done - bars[0].n)
            if done == total:
                bars[0].close()

    try:
        for response in stream_generate(session.model, session.tokenizer, prompt, max_tokens, session, sampler,
                                         prefill_step_size=prefill_step, prompt_progress_callback=progress):
            printer.feed(response.text)
    finally:
        printer.finish()
    return printer, response


def _report(session: Session, response):
    restored = f" ({session.restored} restored from the disk cache)" if session.store is not None else ""
    typer.echo(f"prompt: {response.prompt_tokens} tokens{restored}, {response.prompt_tps:.1f} tokens/s; "
               f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s; "
               f"peak memory {response.peak_memory:.2f} GB", err=True)


def _messages(system: Optional[str], turns: List[dict]) -> List[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def generate(
    model: ModelDir, prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user message.")],
    system: System = None, max_tokens: MaxTokens = 512, temp: Temp = 1.0, top_p: TopP = 1.0, top_k: TopK = 0,
    min_p: MinP = 0.05, seed: Seed = None, nothink: NoThink = False, think: Think = False,
    think_max: ThinkMax = False, ctx: Ctx = 32768, kv_disk_dir: KVDir = None, kv_disk_space_mb: KVSpace = 4096,
    prefill_step: PrefillStep = 2048,
):
    """Answer one prompt, streaming the reasoning and the answer to stdout."""
    mode = mode_from_flags(nothink, think, think_max)
    session = open_session(model, ctx, kv_disk_dir, kv_disk_space_mb, seed)
    text = chat.render(_messages(system, [{"role": "user", "content": prompt}]), mode, context=ctx)
    try:
        _, response = _answer(session, text, mode, max_tokens, make_sampler(temp, top_p, min_p, top_k=top_k),
                              prefill_step)
    except ContextLengthError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    session.save()
    _report(session, response)


HELP = """commands: /think /nothink /think-max  /ctx N  /read FILE  /save  /clear  /quit
Ctrl+C stops an answer; Ctrl+D or /quit leaves."""


def chat_command(
    model: ModelDir, system: System = None, max_tokens: MaxTokens = 4096, temp: Temp = 1.0, top_p: TopP = 1.0,
    top_k: TopK = 0, min_p: MinP = 0.05, seed: Seed = None, nothink: NoThink = False, think: Think = False,
    think_max: ThinkMax = False, ctx: Ctx = 32768, kv_disk_dir: KVDir = None, kv_disk_space_mb: KVSpace = 4096,
    prefill_step: PrefillStep = 2048,
):
    """Talk with the model; the KV cache stays live between turns."""
    session = open_session(model, ctx, kv_disk_dir, kv_disk_space_mb, seed)
    repl = Repl(session, mode_from_flags(nothink, think, think_max), system, max_tokens,
                make_sampler(temp, top_p, min_p, top_k=top_k), prefill_step)
    typer.echo(HELP, err=True)
    repl.run()


class Repl:
    """The chat loop: one message list, rendered whole each turn; the live cache makes only the
    new turn cost prefill. Earlier reasoning is kept in the history (so the cache stays a prefix
    of the next prompt)."""

    def __init__(self, session: Session, mode: str, system, max_tokens: int, sampler, prefill_step: int):
        self.session, self.mode, self.system = session, mode, system
        self.max_tokens, self.sampler, self.prefill_step = max_tokens, sampler, prefill_step
        self.turns: List[dict] = []

    def run(self):
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if line.startswith("/"):
                self.command(line.strip())
            elif line.strip():
                self.ask(line)
        self.session.save()

    def command(self, line: str):
        name, _, argument = line.partition(" ")
        if name in ("/think", "/nothink", "/think-max"):
            self.mode = {"/think": "think", "/nothink": "chat", "/think-max": "think-max"}[name]
        elif name == "/ctx" and argument.strip().isdigit():
            self.session.ctx = int(argument)
            self.session.reset()
        elif name == "/read":
            self.read(Path(argument.strip()))
        elif name == "/save":
            self.save()
        elif name == "/clear":
            self.turns = []
            self.session.reset()
        else:
            typer.echo(HELP, err=True)

    def read(self, path: Path):
        try:
            self.ask(path.read_text())
        except OSError as e:
            typer.echo(f"error: cannot read {path}: {e}", err=True)

    def save(self):
        if self.session.store is None:
            typer.echo("no --kv-disk-dir: nothing to save to", err=True)
        else:
            self.session.save()
            typer.echo(f"saved {len(self.session.tokens)} tokens", err=True)

    def ask(self, text: str):
        turns = self.turns + [{"role": "user", "content": text}]
        prompt = chat.render(_messages(self.system, turns), self.mode, drop_thinking=False, context=self.session.ctx)
        try:
            printer, response = _answer(self.session, prompt, self.mode, self.max_tokens, self.sampler,
                                        self.prefill_step)
        except ContextLengthError as e:
            typer.echo(f"error: {e}", err=True)
            return
        except KeyboardInterrupt:
            typer.echo("[stopped; this turn is dropped]", err=True)
            if any(c.offset != len(self.session.tokens) for c in self.session.caches):
                self.session.reset()  # interrupted between a cache write and its bookkeeping
            return
        answer = {"role": "assistant", "content": "".join(printer.content)}
        if printer.reasoning:
            answer["reasoning_content"] = "".join(printer.reasoning)
        self.turns = turns + [answer]
        _report(self.session, response)
