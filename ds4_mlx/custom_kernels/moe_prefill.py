"""Routed experts for prefill (many tokens) on CUDA: the token-expert rows sorted by expert
(`layers.moe.sort_by_expert`), then two grouped tensor-core products (custom_kernels/prefill_matmul.py)
that read the affine-quantized experts directly: gate and up together with the route-weighted clamped
SwiGLU written in the activation dtype (hidden [R, INTER]), then down ([R, DIM]); the k experts' outputs
are summed per token in fp32 as the reference does.

MLX 0.32.4's CUDA gather_qmm runs affine experts at a few TFLOP/s when many rows share each expert
(`python benchmarks/moe_prefill.py` times both in one run). mxfp4 experts keep gather_qmm (~19 TFLOP/s),
as do Metal, the CPU and fp32 activations. Scratch memory: the sorted rows, hidden and the down output.
"""

import mlx.core as mx

from . import prefill_matmul as pm
from ..layers import moe as layer

PREFILL_ROWS = 1024  # token-expert rows from which prefill takes this path


def applies(x: mx.array, indices: mx.array, w1, w2, w3) -> bool:
    """Affine-quantized stacked experts whose sizes are whole tiles, a tensor-core activation dtype and at
    least PREFILL_ROWS token-expert rows."""
    if x.ndim != 2 or indices.ndim != 2 or indices.size < PREFILL_ROWS:
        return False
    if not all(pm.mode(w) == "affine" for w in (w1, w2, w3)):
        return False
    (experts, inter), dim = w1.weight.shape[:2], x.shape[1]
    return (w2.weight.shape[:2] == (experts, dim)
            and all(pm.tiles_fit(x.dtype, k, w) for k, w in ((dim, w1), (dim, w3), (inter, w2))))


def _row_starts(sorted_experts: mx.array, experts: int) -> mx.array:
    """Each expert's first row in the expert-sorted rows, [E + 1] int32."""
    bounds = mx.arange(experts + 1, dtype=sorted_experts.dtype)
    return mx.sum(sorted_experts[None] < bounds[:, None], axis=1).astype(mx.int32)


def routed_experts(x: mx.array, weights: mx.array, indices: mx.array, w1, w2, w3, limit: float,
                   fp8_activations: bool) -> mx.array:
    """x [N, dim], route weights / expert indices [N, k] -> sum over k of weight * expert(x), fp32 [N, dim]."""
    order, experts, rows, route = layer.sort_by_expert(x, weights, indices)
    rows = rows.reshape(rows.shape[0], -1)
    row_starts = _row_starts(experts, w1.weight.shape[0])
    tile_starts = pm.row_tiles(row_starts)
    inter, dim = w1.weight.shape[1], x.shape[1]

    def gate_up_reference():
        gate = w1(rows[:, None], experts, sorted_indices=True)
        up = w3(rows[:, None], experts, sorted_indices=True)
        return [layer.expert_hidden(gate, up, route, limit, x.dtype, False).reshape(-1, inter)]

    hidden = pm.grouped_product(rows, (w1, w3), row_starts, tile_starts, gate_up_reference,
                                route.astype(mx.float32), limit)
    hidden = layer.fp8_input(hidden, fp8_activations)
    out = pm.grouped_product(hidden, (w2,), row_starts, tile_starts,
                             lambda: [w2(hidden[:, None], experts, sorted_indices=True).reshape(-1, dim)])
    return layer.unsorted_sum(out[:, None], order, indices.shape[1])
