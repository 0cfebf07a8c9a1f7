"""The KV compressor: every `ratio` tokens become one compressed row (gated softmax pooling).

Ratio 4 (CSA layers and the indexer) pools overlapping windows: entry w softmax-pools the
first half of window w-1's channels and the second half of window w's, 2 * ratio slots per
channel. Ratio 128 (HCA layers) pools window w alone. The pooled row is normed, RoPE'd at the
window's first position and rounded like the official QAT (FP8 KV, or Hadamard + FP4 for the
indexer). Works on any chunk of tokens: the incomplete window and the previous window live in
a `CompressorState`, so one-shot prefill, chunked prefill and decode produce the same rows.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import CompressorState
from ..config import ModelArgs
from ..custom_kernels import row_product
from .linear import Linear
from .numerics import RMSNorm, fp4_round_trip, hadamard_rotate, kv_rows
from .rope import RoPE


class Compressor(nn.Module):
    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, for_indexer: bool = False):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.wkv = Linear(args.hidden_size, width)
        self.wgate = Linear(args.hidden_size, width)
        self.ape = mx.zeros((ratio, width), dtype=mx.float32)
        self.norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(args, compressed=True)
        self.for_indexer = for_indexer
        self.rounding = args.indexer_fp4 if for_indexer else args.kv_fp8

    def _project(self, x: mx.array, start: int):
        """Compressor kv and scores (fp32, with the position bias) of x [B, L, dim]: one kernel launch for
        decode-sized x on a GPU (custom_kernels/row_product.py)."""
        length = x.shape[1]
        if length == 1:  # decode: the token's row of the position bias, without an index array
            ape = self.ape[start % self.ratio][None]
        else:
            ape = self.ape[(start + mx.arange(length)) % self.ratio]

        def reference():
            x32 = x.astype(mx.float32)
            return x32 @ self.wkv.weight.astype(mx.float32).T, x32 @ self.wgate.weight.astype(mx.float32).T + ape

        bias = mx.broadcast_to(ape, (x.shape[0], *ape.shape))
        return row_product.pair(x, self.wkv.weight, self.wgate.weight, bias, reference)

    def _pool(self, kv: mx.array, score: mx.array, state: CompressorState):
        """Softmax-pool complete windows kv/score [B, n, ratio, width] -> [B, n, head_dim]."""
        if self.overlap:
            d, r = self.head_dim, self.ratio
            prev_kv = mx.concatenate([state.kv[:, None, :r], kv[:, :-1]], axis=1)
            prev_score = mx.concatenate([state.score[:, None, :r], score[:, :-1]], axis=1)
            kv = mx.concatenate([prev_kv[..., :d], kv[..., d:]], axis=2)
            score = mx.concatenate([prev_score[..., :d], score[..., d:]], axis=2)
        weights = mx.softmax(score, axis=2, precise=True)
        return mx.sum(kv * weights, axis=2)

    def _finish(self, pooled: mx.array, first_window: int, dtype) -> mx.array:
        pooled = pooled.astype(dtype)
        first = first_window * self.ratio
        positions = mx.arange(first, first + pooled.shape[1] * self.ratio, self.ratio)
        if not self.for_indexer:
            return kv_rows(self.norm, self.rope, pooled, positions, self.rounding)
        rows = self.rope(self.norm(pooled), positions)
        return fp4_round_trip(hadamard_rotate(rows), 32) if self.rounding else rows

    def __call__(self, x: mx.array, start: int, state: CompressorState) -> Optional[mx.array]:
        """Feed tokens x [B, L, dim] at positions start.. ; returns the rows of the windows
        completed by this chunk [B, n, head_dim] (None if none) and updates `state`."""
        batch, length, _ = x.shape
        r = self.ratio
        state.ensure(batch)
        kv, score = self._project(x, start)
        pending = start % r
        if length == 1 and pending + 1 < r:  # decode inside a window: store the token's row
            row = pending + (r if self.overlap else 0)
            state.kv[:, row] = kv[:, 0]
            state.score[:, row] = score[:, 0]
            return None
        current = slice(r, 2 * r) if self.overlap else slice(0, r)
        kv = mx.concatenate([state.kv[:, current][:, :pending], kv], axis=1)
        score = mx.concatenate([state.score[:, current][:, :pending], score], axis=1)
        n_windows = (pending + length) // r
        done = n_windows * r
        windows_kv = kv[:, :done].reshape(batch, n_windows, r, state.width)
        windows_score = score[:, :done].reshape(batch, n_windows, r, state.width)
        rows = None
        if n_windows:
            rows = self._finish(self._pool(windows_kv, windows_score, state), start // r, x.dtype)
        self._update_state(state, windows_kv, windows_score, kv[:, done:], score[:, done:])
        return rows

    def _update_state(self, state, windows_kv, windows_score, rest_kv, rest_score):
        r, rest = self.ratio, rest_kv.shape[1]
        pad = ((0, 0), (0, r - rest), (0, 0))
        current_kv = mx.pad(rest_kv, pad)
        current_score = mx.pad(rest_score, pad, constant_values=-mx.inf)
        if self.overlap:
            has_new = windows_kv.shape[1] > 0
            prev_kv = windows_kv[:, -1] if has_new else state.kv[:, :r]
            prev_score = windows_score[:, -1] if has_new else state.score[:, :r]
            current_kv = mx.concatenate([prev_kv, current_kv], axis=1)
            current_score = mx.concatenate([prev_score, current_score], axis=1)
        state.kv, state.score = current_kv, current_score
