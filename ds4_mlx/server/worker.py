"""The inference worker: one thread owns the model and the live `Session` and serves queued jobs
one at a time, in order.

A job's events go back through its `emit` callback. The worker checks the job's `cancelled` flag
between tokens (a client that went away), so the next job starts within a token or two. The
tool-call memory (id -> the exact DSML the model sampled) lives here: the ids of the live
conversation ride along in `session.extra["tool_call_dsml"]`, so every snapshot saves them and a
restored snapshot brings them back."""

import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .. import chat
from ..generate import ContextLengthError, Session, stream_generate
from .request import Request
from .stream import Decoder, Done, Failed, Start

log = logging.getLogger("ds4_mlx.server")
TOOL_CALL_IDS = 100_000
EXTRA_KEY = "tool_call_dsml"


@dataclass
class Job:
    request: Request
    emit: Callable[[object], None]  # called from the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)


class ToolCallMemory:
    """The exact DSML of the most recently used `size` tool-call ids."""

    def __init__(self, size: int = TOOL_CALL_IDS):
        self.size, self.dsml = size, OrderedDict()

    def add(self, calls: Dict[str, str]):
        for call_id, dsml in calls.items():
            self.dsml[call_id] = dsml
            self.dsml.move_to_end(call_id)
        while len(self.dsml) > self.size:
            self.dsml.popitem(last=False)

    def find(self, ids: Iterable[str]) -> Dict[str, str]:
        found = {i: self.dsml[i] for i in ids if i in self.dsml}
        self.add(found)
        return found


def tool_call_ids(messages: List[dict]) -> List[str]:
    return [call.get("id") for m in messages if m.get("role") == "assistant" for call in m.get("tool_calls") or ()]


class Worker:
    """Loads the model with `make_session` (in its own thread, where all MLX work happens) and
    serves jobs until `close`, which stops the running job, fails the queued ones and saves the
    live session to the disk store."""

    def __init__(self, make_session: Callable[[], Session], prefill_step: int = 2048):
        self.make_session, self.prefill_step = make_session, prefill_step
        self.session: Optional[Session] = None
        self.memory = ToolCallMemory()
        self.jobs: queue.Queue = queue.Queue()
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.error = None
        self.busy, self.served = False, 0
        self.thread = threading.Thread(target=self._run, name="ds4-mlx-worker", daemon=True)

    def start(self):
        """Start the thread and wait for the model; re-raises what loading raised."""
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def submit(self, job: Job):
        self.jobs.put(job)

    def close(self):
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join()

    def _run(self):
        try:
            if self._load():
                self._serve_all()
                self.session.save()
        finally:
            mx.clear_streams()  # else the process may abort at exit (MLX streams of a finished thread)

    def _load(self) -> bool:
        try:
            self.session = self.make_session()
            if self.session.store is not None:  # tool calls of conversations saved before a restart
                for extra in self.session.store.extras():
                    self.memory.add(extra.get(EXTRA_KEY, {}))
            return True
        except BaseException as e:  # typer.Exit from a failed load included: `start` re-raises it
            self.error = e
            return False
        finally:
            self.ready.set()

    def _serve_all(self):
        while (job := self.jobs.get()) is not None:
            if self.stopping.is_set():
                job.emit(Failed(503, "the server is shutting down"))
            elif not job.cancelled.is_set():
                self.busy = True
                try:
                    self._serve(job)
                finally:
                    self.busy, self.served = False, self.served + 1

    def _serve(self, job: Job):
        request = job.request
        param = "prompt" if request.messages is None else "messages"
        try:
            text, known = self._prompt(request)
        except ValueError as e:
            return job.emit(Failed(400, str(e), param))
        try:
            self._generate(job, text, known)
        except ContextLengthError as e:
            job.emit(Failed(400, str(e), param, "context_length_exceeded"))
        except Exception as e:  # keep serving; the cache may be half-written
            log.exception("generation failed")
            self.session.reset()
            job.emit(Failed(500, f"generation failed: {e}"))

    def _prompt(self, request: Request):
        """(the prompt text, the DSML of its tool calls in the memory). Those calls also go into
        session.extra, next to the live conversation's: a prefill may save the live session first."""
        if request.messages is None:
            return request.prompt, {}
        known = self.memory.find(tool_call_ids(request.messages))
        text = chat.render(request.messages, request.mode, request.tools, context=self.session.ctx,
                           tool_call_dsml=known)
        self._remember(known)
        return text, known

    def _remember(self, calls: Dict[str, str], replace: bool = False):
        """Add tool calls to session.extra (`replace`: the calls of the live conversation are these)."""
        kept = {} if replace else self.session.extra.get(EXTRA_KEY, {})
        self.session.extra[EXTRA_KEY] = {**kept, **calls}

    def _generate(self, job: Job, text: str, known: Dict[str, str]):
        request, session = job.request, self.session
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(request.temperature, request.top_p, request.min_p, top_k=request.top_k)
        decoder = Decoder(request.mode, request.stop)
        stream = stream_generate(session.model, session.tokenizer, text, request.max_tokens, session, sampler,
                                 prefill_step_size=self.prefill_step)
        try:
            for response in stream:
                if response.generation_tokens == 1:
                    self._started(job, response.prompt_tokens)
                self._emit(job, decoder, decoder.feed(response.text))
                if response.finish_reason is not None:
                    self._emit(job, decoder, decoder.finish())
                if decoder.stopped or job.cancelled.is_set() or self.stopping.is_set():
                    break
        finally:
            stream.close()
        finish = "stop" if decoder.stopped else response.finish_reason or "cancelled"
        calls = decoder.parser.tool_call_dsml if decoder.parser else {}
        if request.messages is not None:
            self._remember({**known, **calls}, replace=True)
        if calls and finish != "cancelled":
            finish = "tool_calls"
        job.emit(Done(finish, response.prompt_tokens, session.reused, response.generation_tokens,
                      decoder.stops.hit))
        log.info(f"{request.endpoint}: {response.prompt_tokens} tokens in, {session.reused} cached, "
                 f"{response.generation_tokens} out, prefill {response.prompt_tps:.1f} tok/s, "
                 f"generation {response.generation_tps:.1f} tok/s, {finish}")

    def _started(self, job: Job, prompt_tokens: int):
        if self.session.restored:  # the snapshot's tool calls, for the next prompts
            self.memory.add(self.session.extra.get(EXTRA_KEY, {}))
        job.emit(Start(prompt_tokens, self.session.reused))

    def _emit(self, job: Job, decoder: Decoder, events: List[chat.Event]):
        for event in events:
            if isinstance(event, chat.ToolCall):
                call = {event.id: decoder.parser.tool_call_dsml[event.id]}
                self.memory.add(call)
                self._remember(call)
            job.emit(event)
