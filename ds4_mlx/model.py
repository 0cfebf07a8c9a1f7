"""DeepSeek V4 (Flash) in MLX: embedding -> `hc_mult` residual streams -> blocks -> HC head.

`Model(args)(inputs [B, L], cache)` returns fp32 logits [B, L, vocab] for every position and
advances `cache` (from `model.make_cache()`). Any split of a sequence into calls (one-shot
prefill, chunks, single tokens) gives the same logits. `model.hidden(...)` returns the
pre-head streams that the MTP block (`model.mtp_logits`) drafts from.
"""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import WindowCache, make_layer_cache
from .config import ModelArgs
from .layers.attention import Attention
from .layers.compiled import decode_graph
from .layers.hyper_connections import HyperConnection, HyperHead
from .layers.linear import Linear
from .layers.moe import MoE
from .layers.numerics import RMSNorm, fp8_input


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.hc_attn = HyperConnection(args)
        self.hc_ffn = HyperConnection(args)
        self.attn_norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer_id)
        self.ffn = MoE(args, layer_id)
        self._attention_input = decode_graph(self, "attention_input")
        self._feed_forward = decode_graph(self, "feed_forward")

    def attention_input(self, streams: mx.array, positions: mx.array):
        """streams [B, L, hc, dim] -> (normed attention input x [B, L, dim], post, comb, and the
        attention's projections of x: Attention.project)."""
        x, post, comb = self.hc_attn.collapse(streams)
        x = self.attn_norm(x)
        return (x, post, comb, *self.attn.project(x, positions))

    def feed_forward(self, out, positions, streams, post, comb, token_ids) -> mx.array:
        """The attention output [B, L, H, D] projected (Attention.output) and folded into the streams,
        then the MoE sub-block: new streams."""
        streams = HyperConnection.expand(self.attn.output(out, positions), streams, post, comb)
        x, post, comb = self.hc_ffn.collapse(streams)
        out = self.ffn(self.ffn_norm(x), token_ids)
        return HyperConnection.expand(out, streams, post, comb)

    def __call__(self, streams: mx.array, cache: WindowCache, token_ids: mx.array,
                 positions: Optional[mx.array] = None) -> mx.array:
        """streams [B, L, hc, dim] -> streams [B, L, hc, dim]; `positions` [L]: the cache's next L positions
        (the model makes them once for all its layers). Around the attention's cache work, the stateless parts
        run as two compiled graphs when decoding on a GPU (layers/compiled.py)."""
        if positions is None:
            positions = mx.arange(cache.offset, cache.offset + streams.shape[1])
        x, post, comb, *projections = self._attention_input(streams, positions)
        out = self.attn.attend(x, projections, cache)
        return self._feed_forward(out, positions, streams, post, comb, token_ids)


class MTPBlock(Block):
    """Multi-token prediction: from the main model's streams at position t and the embedding of
    token t+1, one more (window-only) block and its own HC head predict token t+2."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.fp8_activations = args.fp8_activations
        self.e_proj = Linear(args.hidden_size, args.hidden_size)
        self.h_proj = Linear(args.hidden_size, args.hidden_size)
        self.enorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hc_head = HyperHead(args)

    def __call__(self, streams, next_embeddings, cache, next_ids) -> mx.array:
        e = fp8_input(self.enorm(next_embeddings), self.fp8_activations)
        h = fp8_input(self.hnorm(streams), self.fp8_activations)
        x = self.e_proj(e)[:, :, None] + self.h_proj(h)
        return super().__call__(x, cache, next_ids)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.hc_mult = args.hc_mult
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.head = Linear(args.hidden_size, args.vocab_size)
        self.hc_head = HyperHead(args)
        n = args.num_hidden_layers
        self.mtp = [MTPBlock(args, n + j) for j in range(args.num_nextn_predict_layers)]

    def make_cache(self) -> List[WindowCache]:
        return [make_layer_cache(self.args, i) for i in range(len(self.layers))]

    def make_mtp_cache(self) -> List[WindowCache]:
        n = len(self.layers)
        return [make_layer_cache(self.args, n + j) for j in range(len(self.mtp))]

    def hidden(self, inputs: mx.array, cache: List[WindowCache]) -> mx.array:
        """inputs [B, L] token ids -> pre-head streams [B, L, hc, dim]."""
        x = self.embed(inputs)
        streams = mx.broadcast_to(x[:, :, None], (*x.shape[:2], self.hc_mult, x.shape[-1]))
        start = cache[0].offset  # every layer's cache is at the same position
        positions = mx.arange(start, start + inputs.shape[1])
        for layer, layer_cache in zip(self.layers, cache):
            streams = layer(streams, layer_cache, inputs, positions)
        return streams

    def logits(self, streams: mx.array, hc_head: Optional[HyperHead] = None, norm: Optional[RMSNorm] = None) -> mx.array:
        """Streams [B, L, hc, dim] -> fp32 logits [B, L, vocab] (the MTP block passes its own
        HC head and norm; the LM head is shared)."""
        hc_head = self.hc_head if hc_head is None else hc_head
        norm = self.norm if norm is None else norm
        return self.head(norm(hc_head(streams)).astype(mx.float32)).astype(mx.float32)

    def __call__(self, inputs: mx.array, cache: Optional[List[WindowCache]] = None, **kwargs) -> mx.array:
        cache = self.make_cache() if cache is None else cache
        logits = self.logits(self.hidden(inputs, cache))
        evaluate_caches(cache)
        return logits

    def mtp_logits(self, streams: mx.array, next_ids: mx.array, cache: List[WindowCache]) -> mx.array:
        """Draft logits for token t+2 from the streams at t [B, L, hc, dim] and ids t+1 [B, L]."""
        block = self.mtp[0]
        streams = block(streams, self.embed(next_ids), cache[0], next_ids)
        logits = self.logits(streams, block.hc_head, block.norm)
        evaluate_caches(cache)
        return logits


def evaluate_caches(caches: List[WindowCache]):
    """Schedule the cache arrays for evaluation so their lazy graphs never outgrow one step."""
    mx.async_eval([c.arrays() for c in caches])
