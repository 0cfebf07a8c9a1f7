"""The lightning indexer of CSA layers: picks, per query, the top-k compressed rows to attend.

Keys are the indexer compressor's rows (128-d, normed, RoPE'd, Hadamard-rotated and FP4-rounded);
queries come from the attention's low-rank q (`qr`). The score of key w for query t is
sum_h weight[t, h] * relu(q[t, h] . k[w]), computed with the official bf16 roundings.
"""

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..custom_kernels import indexer as index_kernel
from .compressor import Compressor
from .linear import Linear
from .numerics import fp4_round_trip, hadamard_rotate
from .rope import RoPE


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.topk = args.index_topk
        self.ratio = ratio
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(args.hidden_size, self.n_heads)
        self.compressor = Compressor(args, ratio, self.head_dim, for_indexer=True)
        self.rope = RoPE(args, compressed=True)
        self.qat = args.indexer_fp4
        self.weight_scale = (self.head_dim**-0.5) * (self.n_heads**-0.5)

    def queries(self, qr: mx.array, positions: mx.array):
        """qr [B, L, q_lora_rank] (already FP8-rounded if simulated) -> q [B, L, H, Dh]."""
        batch, length, _ = qr.shape
        q = self.wq_b(qr).reshape(batch, length, self.n_heads, self.head_dim)
        q = self.rope(q, positions)
        if self.qat:
            q = fp4_round_trip(hadamard_rotate(q), 32)
        return q

    def head_weights(self, x: mx.array) -> mx.array:
        """x [B, L, dim] -> per-head score weights [B, L, H] (bf16 like the official code)."""
        return self.weights_proj(x) * mx.array(self.weight_scale, dtype=x.dtype)

    @staticmethod
    def scores(q: mx.array, weights: mx.array, keys: mx.array, visible=None) -> mx.array:
        """q [B, Q, H, Dh], weights [B, Q, H], keys [B, N, Dh] -> index scores [B, Q, N]; with
        `visible` (per-query count of visible keys, [Q] ints or int array) keys w >= count get -inf.
        Decode-sized Q runs the custom kernel where there is a GPU backend, else `reference_scores`."""
        return index_kernel.index_scores(q, weights, keys, visible)


def reference_scores(q: mx.array, weights: mx.array, keys: mx.array, visible=None) -> mx.array:
    """The pure-MLX index scores (see `Indexer.scores`).

    Each head's dot product is rounded to the activation dtype, ReLU'd and weighted in it,
    and the heads are summed in fp32 then rounded once, as the official einsum does."""
    dtype = q.dtype
    per_head = (q.astype(mx.float32) @ mx.swapaxes(keys, -1, -2)[:, None].astype(mx.float32)).astype(dtype)
    per_head = mx.maximum(per_head, 0) * weights[..., None]  # [B, Q, H, N]
    scores = mx.sum(per_head.astype(mx.float32), axis=2).astype(dtype)
    if visible is not None:
        counts = visible if isinstance(visible, mx.array) else mx.array(visible)
        scores = mx.where(mx.arange(keys.shape[1])[None] < counts.reshape(-1, 1), scores, -mx.inf)
    return scores
