"""Per-layer caches of DeepSeek V4: one class per layer kind.

- `WindowCache`  (compress ratio 0): a ring of the last `sliding_window` KV rows.
- `HCACache`     (ratio 128): window + compressed rows + the compressor's rolling state.
- `CSACache`     (ratio 4): window + compressed rows + indexer keys + both compressors' states
                  (including the previous window, whose first half the overlapping pool reads).

Everything stored is final: normed, RoPE'd and (with the QAT simulation) FP8/FP4-rounded rows.
Growing rows live in preallocated buffers that grow in steps. `state` is a flat list of arrays
(scalars as 0-d arrays), exact enough to snapshot and restore a session bit for bit.
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .config import ModelArgs


def _own(x: mx.array) -> mx.array:
    """A new array object for the same value: later in-place writes (`a[i] = v`) to either
    object do not show through the other, so snapshots and restored caches stay independent."""
    return mx.array(x)


class RowBuffer:
    """Rows appended along axis 1 of a preallocated [B, capacity, D] array."""

    step = 256

    def __init__(self):
        self.data: Optional[mx.array] = None
        self.count = 0

    def append(self, rows: mx.array):
        batch, n, dims = rows.shape
        if self.data is None or self.count + n > self.data.shape[1]:
            capacity = ((self.count + n + self.step - 1) // self.step) * self.step
            grown = mx.zeros((batch, capacity, dims), dtype=rows.dtype)
            if self.data is not None:
                grown[:, : self.count] = self.data[:, : self.count]
            self.data = grown
        self.data[:, self.count : self.count + n] = rows
        self.count += n

    def arrays(self) -> list:
        return [self.data]

    def rows(self) -> Optional[mx.array]:
        return None if self.data is None else self.data[:, : self.count]

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.count * self.data.shape[0] * self.data.shape[2] * self.data.itemsize

    @property
    def state(self) -> List[mx.array]:
        return [] if self.data is None else [self.data[:, : self.count]]

    @state.setter
    def state(self, arrays: List[mx.array]):
        self.data = _own(arrays[0]) if arrays else None
        self.count = 0 if self.data is None else self.data.shape[1]


class CompressorState:
    """The rolling state of one compressor, in the official layout.

    kv/score: [B, coff * ratio, coff * head_dim] fp32. With overlap (ratio 4, coff 2) rows
    [0, ratio) hold the previous complete window and rows [ratio, 2 ratio) the current one;
    without overlap, rows [0, ratio) hold the current window. Scores include the position bias;
    rows of a window not yet seen have score -inf.
    """

    def __init__(self, ratio: int, head_dim: int):
        self.ratio, self.coff = ratio, 2 if ratio == 4 else 1
        self.width = self.coff * head_dim
        self.kv: Optional[mx.array] = None
        self.score: Optional[mx.array] = None

    def ensure(self, batch: int):
        if self.kv is None:
            shape = (batch, self.coff * self.ratio, self.width)
            self.kv = mx.zeros(shape, dtype=mx.float32)
            self.score = mx.full(shape, -mx.inf, dtype=mx.float32)

    def arrays(self) -> list:
        return [self.kv, self.score]

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes + self.score.nbytes

    @property
    def state(self) -> List[mx.array]:
        return [] if self.kv is None else [_own(self.kv), _own(self.score)]

    @state.setter
    def state(self, arrays: List[mx.array]):
        self.kv, self.score = (_own(a) for a in arrays) if arrays else (None, None)


class WindowCache(_BaseCache):
    """Sliding-window cache: ring[:, p % window] holds the KV row of position p."""

    def __init__(self, window: int):
        self.window = window
        self.offset = 0
        self.ring: Optional[mx.array] = None

    def window_keys(self, kv: mx.array) -> mx.array:
        """The keys a chunk of new rows kv [B, L, D] attends to, and writes the new rows.

        Returns [B, window + L, D] in position order: key i holds position offset - window + i
        (negative positions are empty ring slots), the last L keys are the new rows.
        """
        batch, length, dims = kv.shape
        if self.ring is None:
            self.ring = mx.zeros((batch, self.window, dims), dtype=kv.dtype)
        oldest = self.offset % self.window  # the ring slot of position offset - window
        parts = [self.ring[:, oldest:], self.ring[:, :oldest], kv]
        keys = mx.concatenate([p for p in parts if p.shape[1]], axis=1)
        kept = min(length, self.window)  # the last `kept` rows go to slots from `first` on, wrapping
        first = (self.offset + length - kept) % self.window
        head = min(kept, self.window - first)
        self.ring[:, first : first + head] = kv[:, length - kept : length - kept + head]
        if head < kept:
            self.ring[:, : kept - head] = kv[:, length - kept + head :]
        return keys

    def advance(self, length: int):
        self.offset += length

    def arrays(self) -> List[mx.array]:
        """The arrays this cache holds (no copies), e.g. to evaluate them."""
        parts = [self.ring] + [a for p in self._parts() for a in p.arrays()]
        return [a for a in parts if a is not None]

    def _parts(self) -> list:
        return []

    @property
    def state(self) -> List:
        ring = [] if self.ring is None else [_own(self.ring)]
        return [mx.array(self.offset), ring] + [p.state for p in self._parts()]

    @state.setter
    def state(self, value):
        offset, ring, *parts = value
        self.offset = int(offset.item()) if isinstance(offset, mx.array) else int(offset)
        self.ring = _own(ring[0]) if ring else None
        for part, arrays in zip(self._parts(), parts):
            part.state = arrays

    @property
    def nbytes(self) -> int:
        ring = 0 if self.ring is None else self.ring.nbytes
        return ring + sum(p.nbytes for p in self._parts())

    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        return self.offset


class HCACache(WindowCache):
    """Window + all compressed rows (ratio 128) + the compressor's rolling state."""

    def __init__(self, window: int, ratio: int, head_dim: int):
        super().__init__(window)
        self.compressor = CompressorState(ratio, head_dim)
        self.entries = RowBuffer()

    def _parts(self) -> list:
        return [self.compressor, self.entries]


class CSACache(HCACache):
    """HCA's parts + the lightning indexer's keys and its compressor's rolling state."""

    def __init__(self, window: int, ratio: int, head_dim: int, index_head_dim: int):
        super().__init__(window, ratio, head_dim)
        self.index_compressor = CompressorState(ratio, index_head_dim)
        self.index_keys = RowBuffer()

    def _parts(self) -> list:
        return [self.compressor, self.entries, self.index_compressor, self.index_keys]


def make_layer_cache(args: ModelArgs, layer_id: int) -> WindowCache:
    ratio = args.compress_ratio(layer_id)
    if ratio == 0:
        return WindowCache(args.sliding_window)
    if ratio == 4:
        return CSACache(args.sliding_window, ratio, args.head_dim, args.index_head_dim)
    return HCACache(args.sliding_window, ratio, args.head_dim)


def cache_nbytes(args: ModelArgs, context: int, batch: int = 1, dtype=mx.bfloat16) -> int:
    """Bytes the main model's caches hold after `context` tokens (what `nbytes` reports)."""
    item = mx.zeros((), dtype=dtype).itemsize
    total = 0
    for layer_id in range(args.num_hidden_layers):
        ratio = args.compress_ratio(layer_id)
        total += args.sliding_window * args.head_dim * item if context else 0
        if ratio and context:
            coff = 2 if ratio == 4 else 1
            state = 2 * (coff * ratio) * (coff * args.head_dim) * 4
            total += state + (context // ratio) * args.head_dim * item
            if ratio == 4:
                total += 2 * (coff * ratio) * (coff * args.index_head_dim) * 4
                total += (context // ratio) * args.index_head_dim * item
    return total * batch


def snapshot(caches: List[WindowCache]) -> list:
    """An exact copy of a session's caches; later writes to the live caches do not change it."""
    return [c.state for c in caches]


def restore(args: ModelArgs, states: list) -> List[WindowCache]:
    """Caches rebuilt from `snapshot` output (or from its arrays after a save and load)."""
    caches = [make_layer_cache(args, i) for i in range(len(states))]
    for cache, state in zip(caches, states):
        cache.state = state
    return caches
