"""Manifold-constrained hyper-connections (mHC): the residual is `hc_mult` streams.

Before each sub-block the streams are collapsed into one input with `pre` weights; after it
the output is expanded back with `post` weights plus a doubly-stochastic mix `comb` of the old
streams (Sinkhorn-normalised). Everything is fp32; the streams are stored in the activation dtype.
"""

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..custom_kernels import hyper_connections as kernels  # its fallback is the *_reference code below


def _mixes(streams: mx.array, fn: mx.array, eps: float):
    """streams [B, L, hc, D] -> (fp32 streams [B, L, hc, D], mixes [B, L, n_fn])."""
    x = streams.astype(mx.float32)
    flat = x.reshape(*x.shape[:-2], -1)
    inv_rms = mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + eps)
    return x, (flat @ fn.T) * inv_rms


def sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    """comb [..., hc, hc] logits -> doubly-stochastic matrix (rows = input streams)."""
    comb = mx.softmax(comb, axis=-1, precise=True) + eps
    comb = comb / (mx.sum(comb, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (mx.sum(comb, axis=-1, keepdims=True) + eps)
        comb = comb / (mx.sum(comb, axis=-2, keepdims=True) + eps)
    return comb


def collapse_reference(streams: mx.array, fn: mx.array, base: mx.array, scale: mx.array, iters: int,
                       eps: float, norm_eps: float):
    """streams [B, L, hc, D] -> (block input [B, L, D], post [B, L, hc], comb [B, L, hc, hc])."""
    hc = streams.shape[-2]
    x, mixes = _mixes(streams, fn, norm_eps)
    pre = mx.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * mx.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = mixes[..., 2 * hc :] * scale[2] + base[2 * hc :]
    comb = sinkhorn(comb.reshape(*comb.shape[:-1], hc, hc), iters, eps)
    block_input = mx.sum(pre[..., None] * x, axis=-2)
    return block_input.astype(streams.dtype), post, comb


def expand_reference(output: mx.array, streams: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """new stream j = post[j] * output + sum_i comb[i, j] * streams[i]."""
    mixed = mx.swapaxes(comb, -1, -2) @ streams.astype(mx.float32)  # [B, L, hc, D]
    new = post[..., None] * output.astype(mx.float32)[..., None, :] + mixed
    return new.astype(output.dtype)


class HyperConnection(nn.Module):
    """One mHC site (before attention or before the MoE of a block)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = hc, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps
        self.fn = mx.zeros(((2 + hc) * hc, hc * args.hidden_size), dtype=mx.float32)
        self.base = mx.zeros(((2 + hc) * hc,), dtype=mx.float32)
        self.scale = mx.zeros((3,), dtype=mx.float32)

    def collapse(self, streams: mx.array):
        """streams [B, L, hc, D] -> (block input [B, L, D], post [B, L, hc], comb [B, L, hc, hc])."""
        return kernels.collapse(streams, self.fn, self.base, self.scale, self.iters, self.eps, self.norm_eps)

    @staticmethod
    def expand(output: mx.array, streams: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """new stream j = post[j] * output + sum_i comb[i, j] * streams[i]."""
        return kernels.expand(output, streams, post, comb)


class HyperHead(nn.Module):
    """Collapses the streams before the final norm and the LM head (no Sinkhorn)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.eps, self.norm_eps = args.hc_eps, args.rms_norm_eps
        self.fn = mx.zeros((hc, hc * args.hidden_size), dtype=mx.float32)
        self.base = mx.zeros((hc,), dtype=mx.float32)
        self.scale = mx.zeros((1,), dtype=mx.float32)

    def __call__(self, streams: mx.array) -> mx.array:
        x, mixes = _mixes(streams, self.fn, self.norm_eps)
        pre = mx.sigmoid(mixes * self.scale + self.base) + self.eps
        return mx.sum(pre[..., None] * x, axis=-2).astype(streams.dtype)
