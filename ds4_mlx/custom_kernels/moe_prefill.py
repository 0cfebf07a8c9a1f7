"""Routed experts for prefill (many tokens) on CUDA: dequantize, then a dense grouped product.

MLX 0.32.4's CUDA `gather_qmm` runs affine-quantized experts at a few TFLOP/s when many rows share
each expert. Measured on an H100 (benchmarks/moe_prefill.py, 256 experts of [2048, 4096], k = 6, all
three products): 2-bit g128 2048 tokens 182 ms with gather_qmm, 61 ms dequantized (3.0x); 4096 tokens
363 vs 61 ms (5.9x); 4-bit g64 128 vs 62 ms (2.0x) and 255 vs 64 ms (4.0x). The dequantization of all
experts is most of the 61 ms, so longer chunks amortise it.

So for N * k >= PREFILL_ROWS token-expert rows the experts are dequantized EXPERT_BLOCK at a time and
each block's rows (grouped by expert: a contiguous range of the expert-sorted rows) go through gate/up,
the clamped SwiGLU times the route weight, and down, with the reference's helpers
(`layers.moe.sort_by_expert`, `expert_hidden`, `unsorted_sum`).

Numerics: the weights are rounded to the activation dtype (relative 2^-9 in bf16) before the product,
where gather_qmm uses them unrounded; everything else rounds where the reference rounds. mxfp4 experts
keep gather_qmm (fast there), as do Metal and the CPU.

Memory: the blocks are queued ahead of the GPU, so several blocks' dequantized weights are alive at once
(4 layers, 2048-token chunks: 24.6 GB peak against 18.4 GB with gather_qmm on an H100).
"""

from typing import List

import mlx.core as mx

from ..layers import moe as layer

PREFILL_ROWS = 1024
EXPERT_BLOCK = 16


def applies(x: mx.array, indices: mx.array, w1, w2, w3) -> bool:
    """Affine-quantized stacked experts and at least PREFILL_ROWS token-expert rows."""
    if x.ndim != 2 or indices.ndim != 2 or indices.size < PREFILL_ROWS:
        return False
    return all(getattr(w, "mode", None) == "affine" and getattr(w, "biases", None) is not None
               and getattr(w, "global_scale", None) is None and "bias" not in w for w in (w1, w2, w3))


def _dequantized(linear, first: int, last: int, dtype) -> mx.array:
    """Experts first..last-1 of a quantized stacked linear as [n, in, out] in `dtype` (gather_mm's rhs)."""
    w = mx.dequantize(linear.weight[first:last], linear.scales[first:last], linear.biases[first:last],
                      group_size=linear.group_size, bits=linear.bits, mode="affine", dtype=dtype)
    return mx.swapaxes(w, -1, -2)


def _block_starts(sorted_experts: mx.array, experts: int) -> List[int]:
    """Row offsets where each block of EXPERT_BLOCK experts starts in the expert-sorted rows (host ints)."""
    bounds = mx.arange(0, experts + EXPERT_BLOCK, EXPERT_BLOCK, dtype=sorted_experts.dtype)
    return mx.sum(sorted_experts[None] < bounds[:, None], axis=1).tolist()


def routed_experts(x: mx.array, weights: mx.array, indices: mx.array, w1, w2, w3, limit: float,
                   fp8_activations: bool) -> mx.array:
    """x [N, dim], route weights / expert indices [N, k] -> sum over k of weight * expert(x), fp32 [N, dim]."""
    order, experts, rows, route = layer.sort_by_expert(x, weights, indices)
    starts = _block_starts(experts, w1.weight.shape[0])
    outputs = []
    for b, (r0, r1) in enumerate(zip(starts[:-1], starts[1:])):
        if r0 == r1:
            continue
        e0, e1 = b * EXPERT_BLOCK, min((b + 1) * EXPERT_BLOCK, w1.weight.shape[0])
        picks = experts[r0:r1] - e0

        def product(linear, lhs):
            return mx.gather_mm(lhs, _dequantized(linear, e0, e1, x.dtype), rhs_indices=picks, sorted_indices=True)

        block_rows = rows[r0:r1]
        hidden = layer.expert_hidden(product(w1, block_rows), product(w3, block_rows), route[r0:r1], limit,
                                     x.dtype, fp8_activations)
        outputs.append(product(w2, hidden))
    out = mx.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]
    return layer.unsorted_sum(out, order, indices.shape[1])
