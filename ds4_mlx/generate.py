"""Generation in the manner of mlx-lm: `generate`, `stream_generate`, and the live `Session`.

A `Session` owns one model cache and the token ids it holds. A new prompt reuses the live cache
when the live tokens are a prefix of it, else the longest prefix saved in the disk store, and
prefills only the rest (in chunks, with progress). Caches cannot be rolled back, so a prompt
that diverges from the live tokens starts from the store or from scratch.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .chat import USER
from .model import Model, evaluate_caches

Progress = Callable[[int, int], None]


class ContextLengthError(ValueError):
    """A prompt that does not fit the session's context."""


@dataclass
class Session:
    """The live state of one conversation.

    `tokens` are in the cache and `logits` predict the token after them. `transcript` (the last
    prompt and what was generated after it) may run one token ahead: the last sampled token is
    fed to the model by the next prefill. `text` is the transcript as text."""

    model: Model
    tokenizer: TokenizerWrapper
    ctx: Optional[int] = None
    store: Optional[object] = None  # a ds4_mlx.kvstore.KVStore
    save_interval: int = 8192  # snapshot to the store at least every this many new tokens
    min_save: int = 512  # a prefill of at least this many new tokens is snapshotted
    tokens: List[int] = field(default_factory=list)
    transcript: List[int] = field(default_factory=list)
    prompt_text: str = ""  # the text of transcript[:prompt_length]
    prompt_length: int = 0
    logits: Optional[mx.array] = None
    reused: int = 0  # tokens of the last prompt already in the cache (live or from the store)
    restored: int = 0  # of which came from the disk store
    saved_at: int = 0
    extra: dict = field(default_factory=dict)  # saved with snapshots (JSON), restored with them

    def __post_init__(self):
        self.caches = self.model.make_cache()

    def reset(self):
        self.caches = self.model.make_cache()
        self.tokens, self.transcript, self.logits, self.saved_at = [], [], None, 0
        self.prompt_text, self.prompt_length = "", 0

    @property
    def text(self) -> str:
        generated = self.transcript[self.prompt_length :]
        return self.prompt_text + self.tokenizer.decode(generated, skip_special_tokens=False)

    def encode(self, text: str) -> List[int]:
        """Token ids of a rendered prompt. When it extends the transcript's text, the transcript's
        ids are kept and only the new text is tokenized, so the live cache stays reusable."""
        live = self.text
        if live and text.startswith(live):
            return self.transcript + self.tokenizer.encode(text[len(live):], add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prefill(self, prompt: Sequence[int], text: Optional[str] = None, step: int = 2048,
                progress: Optional[Progress] = None, checkpoint: Optional[int] = None) -> mx.array:
        """Bring the cache to `prompt` (ids; `text`: the same as text) and return the logits for
        the token after it. With a store, snapshots are saved at `checkpoint` (a position that
        later prompts are likely to share, such as the end of the system prompt), every
        `save_interval` tokens, and at the end of a prefill of `min_save` tokens or more."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if self.ctx is not None and len(prompt) >= self.ctx:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context is {self.ctx} "
                                     f"tokens (--ctx); shorten the prompt or raise --ctx")
        self._reuse(prompt)
        start = self.reused = len(self.tokens)
        ends = set(range(start + step, len(prompt), step)) | {len(prompt)}
        if checkpoint is not None and start < checkpoint < len(prompt):
            ends.add(checkpoint)
        for end in sorted(e for e in ends if e > start):
            save = self.store is not None and (end == checkpoint or end - self.saved_at >= self.save_interval
                                               or (end == len(prompt) and end - self.reused >= self.min_save))
            self._feed(prompt[start:end], with_logits=save or end == len(prompt))
            if save:
                self.save()
            if progress:
                progress(end - self.reused, len(prompt) - self.reused)
            start = end
        self.transcript, self.prompt_length = list(prompt), len(prompt)
        self.prompt_text = text if text is not None else self.tokenizer.decode(prompt, skip_special_tokens=False)
        return self.logits

    def _reuse(self, prompt: List[int]):
        """Keep the live cache if it is a prefix of `prompt`, else save it (for a later return to
        that conversation) and restore the store's longest prefix of `prompt`."""
        self.restored = 0
        if self.logits is not None and self.tokens == prompt[: len(self.tokens)]:
            return
        self.save()
        self.reset()
        hit = self.store.lookup(prompt) if self.store is not None else None
        saved = self.store.load(hit, self.model.args) if hit is not None else None
        if saved is not None:
            self.caches, self.tokens, self.logits = saved.caches, list(saved.tokens), saved.logits
            self.restored = self.saved_at = len(self.tokens)
            self.extra = _merged(saved.extra, self.extra)

    def _feed(self, chunk: List[int], with_logits: bool):
        streams = self.model.hidden(mx.array(chunk, dtype=mx.int32)[None], self.caches)
        self.logits = self.model.logits(streams[:, -1:])[0, -1] if with_logits else None
        mx.eval([c.arrays() for c in self.caches], self.logits)
        self.tokens.extend(chunk)

    def save(self):
        """Snapshot the live cache into the disk store (if any, and if worth it)."""
        if self.store is None or self.logits is None or len(self.tokens) < self.min_save:
            return
        if self.saved_at != len(self.tokens):
            self.store.save(self.tokens, self.caches, self.logits, self.extra)
            self.saved_at = len(self.tokens)

    def generate_tokens(self, prompt: Sequence[int], max_tokens: int, sampler=None, logits_processors=None,
                        prefill_step_size: int = 2048, progress: Optional[Progress] = None, text=None,
                        checkpoint: Optional[int] = None):
        """Yields (token, logprobs [vocab]) after prefilling `prompt`. Each step's graph is built
        while the previous one evaluates, as mlx-lm does; generation stops at the context end."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        sampler = sampler or make_sampler(0.0)
        logits = self.prefill(prompt, text, prefill_step_size, progress, checkpoint)
        history = mx.array(list(prompt), dtype=mx.int32)
        limit = self.token_limit(len(prompt), max_tokens)

        def sample(logits, history):
            logits = logits[None]
            for processor in logits_processors or ():
                logits = processor(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs)[0], logprobs[0]

        token, logprobs = sample(logits, history)
        mx.async_eval(token, logprobs)
        for n in range(limit):
            pending = None
            if n + 1 < limit:  # feed this token and sample the next before reading this one
                history = mx.concatenate([history, token[None]])
                pending = sample(self._step(token), history)
                mx.async_eval(*pending)
            value = token.item()
            self.transcript.append(value)
            if pending is not None:
                self.tokens.append(value)
                if self.store is not None and len(self.tokens) - self.saved_at >= self.save_interval:
                    self.save()
            yield value, logprobs
            if pending is None:
                return
            token, logprobs = pending

    def token_limit(self, prompt_length: int, max_tokens: int) -> int:
        """How many tokens a generation after a prompt may produce (the context is the limit)."""
        return max_tokens if self.ctx is None else min(max_tokens, self.ctx - prompt_length)

    def _step(self, token: mx.array) -> mx.array:
        self.logits = self.model.logits(self.model.hidden(token.reshape(1, 1), self.caches))[0, -1]
        evaluate_caches(self.caches)
        return self.logits


def stream_generate(model: Model, tokenizer, prompt: Union[str, Sequence[int]], max_tokens: int = 256,
                    session: Optional[Session] = None, sampler=None, logits_processors=None,
                    prefill_step_size: int = 2048, prompt_progress_callback: Optional[Progress] = None,
                    ) -> Generator[GenerationResponse, None, None]:
    """mlx-lm's `stream_generate` for ds4-mlx models: yields a `GenerationResponse` per token.

    `prompt` is a rendered prompt (str, see `ds4_mlx.chat.render`) or token ids. Pass a `Session`
    to keep the cache (and its disk store) between calls; with a store, the prompt is also
    snapshotted just before its last user turn, the part later prompts are likely to share."""
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    session = session or Session(model, tokenizer)
    text = prompt if isinstance(prompt, str) else None
    ids = session.encode(prompt) if text is not None else list(prompt)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = session.generate_tokens(ids, max_tokens, sampler, logits_processors, prefill_step_size,
                                    prompt_progress_callback, text, last_user_turn(tokenizer, ids))
    limit = session.token_limit(len(ids), max_tokens)
    tic, prompt_tps, generated, finish = time.perf_counter(), 0.0, [], "length"

    def response(segment, logprobs, reason=None):
        n = len(generated)
        return GenerationResponse(
            text=segment, token=generated[-1], logprobs=logprobs, from_draft=False, prompt_tokens=len(ids),
            prompt_tps=prompt_tps, generation_tokens=n, generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=reason)

    for token, logprobs in steps:
        if not generated:
            prompt_tps = (len(ids) - session.reused) / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        generated.append(token)
        if token in tokenizer.eos_token_ids:
            finish = "stop"
            break
        detokenizer.add_token(token)
        if len(generated) == limit:
            break
        yield response(detokenizer.last_segment, logprobs)
    steps.close()
    detokenizer.finalize()
    yield response(detokenizer.last_segment, logprobs, finish)


def _merged(saved: dict, live: dict) -> dict:
    """`live` over `saved`, where a dict in both (a map such as tool-call id -> DSML) is merged."""
    merged = {**saved, **live}
    for key, value in live.items():
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            merged[key] = {**saved[key], **value}
    return merged


def last_user_turn(tokenizer, ids: Sequence[int]) -> Optional[int]:
    """Position of the prompt's last user-turn token (what precedes it is shared by the next
    prompts of the same conversation and of others with the same system prompt), if any."""
    user = tokenizer.convert_tokens_to_ids(USER)
    positions = [i for i, token in enumerate(ids) if token == user]
    return positions[-1] if positions else None


def generate(model: Model, tokenizer, prompt: Union[str, Sequence[int]], max_tokens: int = 256,
             verbose: bool = False, **kwargs) -> str:
    """The whole generated text (mlx-lm's `generate`)."""
    text, response = "", None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print(f"\nPrompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s; "
              f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s; "
              f"peak memory {response.peak_memory:.2f} GB")
    return text
