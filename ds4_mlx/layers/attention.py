"""DeepSeek V4 attention: one 512-wide KV head (K == V) shared by all query heads.

Each query attends, in one softmax with a per-head sink, to the last `sliding_window` raw KV rows
(itself included) and, on compressed layers, to compressed rows: all visible ones on HCA layers
(ratio 128), the indexer's top-k of the visible ones on CSA layers (ratio 4). Compressed row w is
visible to the query at position t once its window is complete: w < (t + 1) // ratio.

Decode (a few queries) runs the custom kernel of custom_kernels/attention.py where there is a GPU
backend, prefill the tensor-core kernels of custom_kernels/prefill_attention.py on CUDA; the pure-MLX
reference here processes queries in blocks sized to bound memory.
"""

from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from .linear import Linear, StackedLinear

from ..cache import WindowCache
from ..custom_kernels import attention as attention_kernels
from ..custom_kernels import prefill_attention, prefill_index
from ..custom_kernels import rope as rope_kernel
from ..config import ModelArgs
from .compiled import decode_graph
from .compressor import Compressor
from .indexer import Indexer
from .numerics import RMSNorm, fp8_input, kv_rows
from .rope import RoPE

SCORE_BUDGET = 1 << 25  # fp32 score elements per query block


def even_blocks(first: int, end: int, most: int):
    """first..end-1 cut into the fewest ranges (a, b) of at most `most` (>= 1), of near-equal sizes."""
    count = -(-(end - first) // max(1, most))
    size = -(-(end - first) // max(1, count))
    return [(a, min(end, a + size)) for a in range(first, end, size)]


def head_rms_norm(q: mx.array, eps: float) -> mx.array:
    """Weightless RMS normalisation per head, rounded at every step in q's dtype (official)."""
    mean_square = mx.mean((q * q).astype(mx.float32), axis=-1, keepdims=True).astype(q.dtype)
    return q * mx.rsqrt(mean_square + eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.window = args.sliding_window
        self.ratio = args.compress_ratio(layer_id)
        self.eps = args.rms_norm_eps
        self.groups, self.o_rank = args.o_groups, args.o_lora_rank
        self.scale = self.head_dim**-0.5

        self.wq_a = Linear(args.hidden_size, args.q_lora_rank)
        self.q_norm = RMSNorm(args.q_lora_rank, eps=self.eps)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim)
        self.wkv = Linear(args.hidden_size, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, eps=self.eps)
        group_in = self.n_heads * self.head_dim // self.groups
        self.wo_a = StackedLinear(group_in, self.o_rank, self.groups)
        self.wo_b = Linear(self.groups * self.o_rank, args.hidden_size)
        # not a parameter (leading underscore); built from a list, so already evaluated: a lazy mx.arange would
        # stay an Arange op in every compiled decode graph that reads it
        self._group_ids = mx.array(list(range(self.groups)), dtype=mx.uint32)
        self.attn_sink = mx.zeros((self.n_heads,), dtype=mx.float32)
        self.rope = RoPE(args, compressed=self.ratio > 0)
        if self.ratio:
            self.compressor = Compressor(args, self.ratio, self.head_dim)
        if self.ratio == 4:
            self.indexer = Indexer(args, self.ratio)
        self._project = decode_graph(self, "project")
        self._output = decode_graph(self, "output")

    def project(self, x: mx.array, positions: mx.array):
        """x [B, L, dim] -> the stateless projections: queries [B, L, H, D] (normed, RoPE'd), the new
        KV rows [B, L, D], and on CSA layers the indexer's queries and head weights."""
        batch, length, _ = x.shape
        fp8 = self.args.fp8_activations
        x_in = fp8_input(x, fp8)
        qr = fp8_input(self.q_norm(self.wq_a(x_in)), fp8)
        q = self.wq_b(qr).reshape(batch, length, self.n_heads, self.head_dim)
        q = rope_kernel.head_norm_rotate(q, positions, self.rope.dim_freq, self.eps,
                                         lambda: self.rope(head_rms_norm(q, self.eps), positions))
        kv = kv_rows(self.kv_norm, self.rope, self.wkv(x_in), positions, self.args.kv_fp8)
        if self.ratio != 4:
            return q, kv
        return q, kv, self.indexer.queries(qr, positions), self.indexer.head_weights(x)

    def output(self, out: mx.array, positions: mx.array) -> mx.array:
        """Attention output [B, L, H, D] -> [B, L, dim]: inverse RoPE, grouped wo_a, wo_b."""
        batch, length = out.shape[:2]
        out = self.rope(out, positions, inverse=True).reshape(batch, length, self.groups, 1, -1)
        out = self.wo_a.per_group(out, self._group_ids).reshape(batch, length, -1)
        return self.wo_b(fp8_input(out, self.args.fp8_activations))

    def __call__(self, x: mx.array, cache: WindowCache) -> mx.array:
        """x [B, L, dim] at the cache's position -> [B, L, dim]; advances the cache. (The model's
        blocks run the same three steps, with project and output inside their compiled graphs.)"""
        positions = mx.arange(cache.offset, cache.offset + x.shape[1])
        return self._output(self.attend(x, self._project(x, positions), cache), positions)

    def attend(self, x: mx.array, projections, cache: WindowCache) -> mx.array:
        """The cache's part: x [B, L, dim] and its `project` outputs -> the attention output before
        `output` [B, L, H, D]; writes the new rows to the cache and advances it."""
        q, kv, *index_inputs = projections  # index_inputs: CSA layers' (queries, weights)
        start, length = cache.offset, x.shape[1]
        window_keys = cache.window_keys(kv)
        compressed = index = None
        if self.ratio:
            compressed = self._compress(self.compressor, x, start, cache.compressor, cache.entries)
        if self.ratio == 4:
            index_keys = self._compress(self.indexer.compressor, x, start, cache.index_compressor, cache.index_keys)
            index = (*index_inputs, index_keys)
        cache.advance(length)
        return self._attend(q, start, window_keys, compressed, index)

    @staticmethod
    def _compress(compressor, x, start, state, buffer) -> Optional[mx.array]:
        rows = compressor(x, start, state)
        if rows is not None:
            buffer.append(rows)
        return buffer.rows()

    def _attend(self, q, start, window_keys, compressed, index) -> mx.array:
        """q [B, L, H, D] -> attention output [B, L, H, D]: decode (a few queries) in one kernel over all
        keys; prefill in the tensor-core kernels where they apply, else query block by query block."""
        length = q.shape[1]
        n_compressed = 0 if compressed is None else compressed.shape[1]
        if index is not None and n_compressed <= self.indexer.topk:
            index = None  # every visible row is picked: attend to all of them
        if length <= attention_kernels.MAX_QUERIES:
            selection = self._selection(index, start, 0, length) if index is not None else None
            keys = window_keys[:, 1 : self.window + length]
            return attention_kernels.decode_attention(
                q, window_keys, compressed, selection, self.attn_sink, start=start, ratio=self.ratio,
                scale=self.scale, reference=lambda: self._attend_block(q, start, keys, compressed, selection))
        if prefill_attention.applies(q, window_keys, compressed):
            return self._attend_kernel(q, start, window_keys, compressed, index)
        return self._attend_range(q, start, window_keys, compressed, index, 0, length)

    def _attend_range(self, q, start, window_keys, compressed, index, first, end) -> mx.array:
        """Queries first .. end - 1 of the chunk (pure MLX), query block by query block -> [B, end - first, H, D]."""
        n_compressed = 0 if compressed is None else compressed.shape[1]
        columns = self.window + (self.indexer.topk if index is not None else n_compressed)
        per_query = max(self.n_heads * columns, self.indexer.n_heads * n_compressed if index is not None else 0)
        # a block of Q queries scores window + Q - 1 window keys: Q = window halves the waste
        block = max(1, min(end - first, self.window, SCORE_BUDGET // per_query))
        outputs = []
        for a in range(first, end, block):
            b = min(end, a + block)
            selection = self._selection(index, start, a, b) if index is not None else None
            outputs.append(self._attend_block(q[:, a:b], start + a, window_keys[:, a + 1 : self.window + b],
                                              compressed, selection))
        return mx.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]

    def _attend_kernel(self, q, start, window_keys, compressed, index) -> mx.array:
        """All queries of the chunk through custom_kernels/prefill_attention.py, in blocks within its score budget."""
        batch, length = q.shape[:2]
        n_compressed = 0 if compressed is None else compressed.shape[1]
        n_columns = prefill_attention.columns(self.window, self.indexer.topk if index is not None else n_compressed)
        outputs = []
        for a, b in even_blocks(0, length, prefill_attention.block_queries(batch, self.n_heads, n_columns)):
            picks = self._picks(index, start, a, b) if index is not None else None
            outputs.append(prefill_attention.attend(
                q, window_keys, compressed, picks, self.attn_sink, start=start, first=a, count=b - a,
                ratio=self.ratio, scale=self.scale,
                reference=partial(self._attend_range, q, start, window_keys, compressed, index, a, b)))
        return mx.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]

    def _picks(self, index, start, a, b) -> mx.array:
        """The indexer's picks for queries a..b-1 as row indices [B, b - a, k] (-1: none), in blocks whose index
        scores (per head, unless the prefill kernel sums the heads) stay within SCORE_BUDGET."""
        iq, iw, index_keys = index
        per_query = index_keys.shape[1] * (1 if prefill_index.applies(iq, iw, index_keys) else self.indexer.n_heads)
        picks = [attention_kernels.pick_rows(self._selection(index, start, lo, hi))
                 for lo, hi in even_blocks(a, b, SCORE_BUDGET // per_query)]
        return mx.concatenate(picks, axis=1) if len(picks) > 1 else picks[0]

    def _selection(self, index, start, a, b):
        """The indexer's picks for queries a..b-1 of the chunk (at positions start + a ..)."""
        iq, iw, index_keys = index
        return self._select(iq[:, a:b], iw[:, a:b], index_keys, start + a)

    def _attend_block(self, q, first, keys, compressed, selection):
        """Queries at positions first.. (q [B, Q, H, D]) over their window keys [B, window+Q-1, D]
        (key j at position first - window + 1 + j) and the compressed rows: the indexer's picks
        `selection` = (rows [B, Q, k], valid [B, Q, k] or None) on sparse CSA layers, else all visible rows."""
        n_queries = q.shape[1]
        query_pos = first + mx.arange(n_queries)[:, None]
        key_pos = first - self.window + 1 + mx.arange(keys.shape[1])[None]
        window_mask = (key_pos >= 0) & (key_pos <= query_pos) & (key_pos > query_pos - self.window)
        q32 = mx.swapaxes(q, 1, 2).astype(mx.float32)  # [B, H, Q, D]
        groups = [self._shared_keys(q32, keys, window_mask)]
        if compressed is not None and selection is not None:
            picks, valid = selection
            rows = compressed[mx.arange(compressed.shape[0])[:, None, None], picks]  # [B, Q, k, D]
            groups.append(self._per_query_keys(q32, rows, valid))
        elif compressed is not None:
            visible = mx.arange(compressed.shape[1])[None] < (query_pos + 1) // self.ratio
            groups.append(self._shared_keys(q32, compressed, visible))
        return self._softmax_values(groups, q.dtype)

    def _shared_keys(self, q32, keys, mask):
        """Keys [B, S, D] seen by all queries of the block under mask [Q, S]."""
        keys32 = keys.astype(mx.float32)[:, None]  # [B, 1, S, D]
        scores = mx.where(mask, (q32 @ mx.swapaxes(keys32, -1, -2)) * self.scale, -mx.inf)
        return scores, lambda p: p @ keys32

    def _per_query_keys(self, q32, rows, valid):
        """Each query's own keys rows [B, Q, k, D] under valid [B, Q, k] (None: all valid)."""
        rows32 = rows.astype(mx.float32)
        scores = mx.swapaxes(mx.swapaxes(q32, 1, 2) @ mx.swapaxes(rows32, -1, -2), 1, 2) * self.scale
        if valid is not None:
            scores = mx.where(valid[:, None], scores, -mx.inf)
        return scores, lambda p: mx.swapaxes(mx.swapaxes(p, 1, 2) @ rows32, 1, 2)

    def _select(self, iq, iw, index_keys, first: int):
        """Top-k visible compressed rows for queries at positions first.. : (row indices [B, Q, k],
        valid [B, Q, k], or None when every pick is valid: all rows visible to every query, as in a
        decode step)."""
        n_keys = index_keys.shape[1]
        visible = [(first + j + 1) // self.ratio for j in range(iq.shape[1])]
        masked = visible[0] < n_keys
        scores = Indexer.scores(iq, iw, index_keys, visible if masked else None)
        k = self.indexer.topk
        picks = mx.argpartition(-scores.astype(mx.float32), k - 1, axis=-1)[..., :k]
        if not masked:
            return picks, None
        return picks, mx.take_along_axis(scores, picks, axis=-1) > -mx.inf

    def _softmax_values(self, groups, dtype) -> mx.array:
        """One softmax over all key groups [(scores [B, H, Q, S], P -> P @ V)] plus the sink,
        which enters the denominator only. P is rounded to the activation dtype before P @ V,
        as in the official kernel. Returns [B, Q, H, D] in `dtype`."""
        peak = mx.concatenate([mx.max(s, axis=-1, keepdims=True) for s, _ in groups], axis=-1)
        peak = mx.max(peak, axis=-1, keepdims=True)
        probs = [mx.exp(s - peak) for s, _ in groups]
        denominator = sum(mx.sum(p, axis=-1, keepdims=True) for p in probs)
        denominator = denominator + mx.exp(self.attn_sink[:, None, None] - peak)
        out = sum(apply(p.astype(dtype).astype(mx.float32)) for p, (_, apply) in zip(probs, groups))
        return mx.swapaxes(out / denominator, 1, 2).astype(dtype)
