"""MLX affine quantization that minimises each group's (importance-weighted) reconstruction error.

MLX's affine format stores, per group of `group_size` consecutive inputs, a scale s and a bias b
(in the weight dtype) and codes q in [0, 2^bits - 1]; the weight is dequantized as s * q + b.
`mx.quantize` takes s and b from the group's min and max (round to nearest). Here each group
minimises sum_i w_i (x_i - s q_i - b)^2 instead:

1. a grid of candidate steps around min/max: codes q = round((x - min) * (n + d) / (max - min)),
   clipped to [0, n], for each d in GRID (d > 0 clips the extremes, d < 0 widens the range);
2. for the codes of each candidate, the best (s, b) is a weighted 2x2 least-squares fit; the
   candidate with the lowest error wins;
3. REFINE alternating steps: codes by rounding for the current (s, b), then the fit again;
4. s is rounded to bfloat16 (as stored), b refitted for it and rounded, then the final codes chosen.

The result is exactly representable: `mx.dequantize` of the output gives s * q + b.
"""

from typing import Optional, Tuple

import mlx.core as mx

GRID = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
REFINE = 2


def _fit(x: mx.array, q: mx.array, w: Optional[mx.array], stats) -> Tuple[mx.array, mx.array, mx.array]:
    """Least-squares (s, b) of x ~ s q + b per group (row) and its weighted squared error."""
    sw, swx, swxx = stats
    wq = q if w is None else w * q
    swq, swqq, swqx = (mx.sum(a, axis=-1, keepdims=True) for a in (wq, wq * q, wq * x))
    det = sw * swqq - swq * swq
    ok = det > 0  # not all codes equal
    det = mx.where(ok, det, 1)
    s = mx.where(ok, (sw * swqx - swq * swx) / det, 0)
    b = mx.where(ok, (swqq * swx - swq * swqx) / det, swx / sw)
    err = swxx - 2 * (s * swqx + b * swx) + s * s * swqq + 2 * s * b * swq + b * b * sw
    return s, b, err


def _codes(x: mx.array, s: mx.array, b: mx.array, n: int) -> mx.array:
    return mx.clip(mx.round((x - b) / mx.where(s == 0, 1, s)), 0, n)


def _search(x: mx.array, w: Optional[mx.array], n: int) -> Tuple[mx.array, mx.array]:
    """x [groups, group_size] float32, w like x or None (uniform) -> (s, b) [groups, 1]."""
    wx = x if w is None else w * x
    sw = mx.full((x.shape[0], 1), x.shape[1], mx.float32) if w is None else mx.sum(w, axis=-1, keepdims=True)
    stats = (sw, mx.sum(wx, axis=-1, keepdims=True), mx.sum(wx * x, axis=-1, keepdims=True))
    lo, hi = mx.min(x, axis=-1, keepdims=True), mx.max(x, axis=-1, keepdims=True)
    span = mx.maximum(hi - lo, 1e-30)
    best = None
    for d in GRID:
        fit = _fit(x, mx.clip(mx.round((x - lo) * ((n + d) / span)), 0, n), w, stats)
        best = fit if best is None else _better(fit, best)
    for _ in range(REFINE):
        s, b, _ = best
        best = _better(_fit(x, _codes(x, s, b, n), w, stats), best)
    return best[0], best[1]


def _better(new, old):
    keep = new[2] < old[2]
    return tuple(mx.where(keep, a, b) for a, b in zip(new, old))


def _pack(q: mx.array, bits: int) -> mx.array:
    """Codes [rows, in] -> uint32 [rows, in * bits / 32], first element in the lowest bits (MLX layout)."""
    per_word = 32 // bits
    q = q.astype(mx.uint32).reshape(q.shape[0], -1, per_word)
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    return mx.sum(mx.left_shift(q, shifts), axis=-1).astype(mx.uint32)


def _stored(groups: mx.array, w: Optional[mx.array], s: mx.array, b: mx.array, n: int):
    """(s, b) as stored (bfloat16): s rounded, b refitted for the rounded s (the weighted mean residual
    of its codes), then rounded."""
    s = s.astype(mx.bfloat16)
    r = groups - s.astype(mx.float32) * _codes(groups, s.astype(mx.float32), b, n)
    if w is None:
        b = mx.mean(r, axis=-1, keepdims=True)
    else:
        b = mx.sum(w * r, axis=-1, keepdims=True) / mx.sum(w, axis=-1, keepdims=True)
    return s, b.astype(mx.bfloat16)


def affine_quantize(
    x: mx.array, group_size: int, bits: int, importance: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array, mx.array]:
    """x [rows, in] -> (uint32 weight, scales, biases) in MLX's affine layout, scales and biases bfloat16.

    `importance` [in] (non-negative, per input channel) weights the squared error; None = uniform.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"affine_quantize supports 2, 4 and 8 bits, not {bits}")
    rows, cols = x.shape
    n = (1 << bits) - 1
    groups = x.astype(mx.float32).reshape(-1, group_size)
    w = None
    if importance is not None:
        w = importance.astype(mx.float32).reshape(1, -1, group_size)
        w = mx.broadcast_to(w, (rows, cols // group_size, group_size)).reshape(-1, group_size)
        w = mx.where(mx.sum(w, axis=-1, keepdims=True) > 0, w, 1)  # a group of zero weights: uniform
    s, b = _stored(groups, w, *_search(groups, w, n), n)
    q = _codes(groups, s.astype(mx.float32), b.astype(mx.float32), n)
    shape = (rows, cols // group_size)
    return _pack(q.reshape(rows, cols), bits), s.reshape(shape), b.reshape(shape)


def rtn_quantize(x: mx.array, group_size: int, bits: int, importance=None):
    """Plain round to nearest from min/max (`mx.quantize` of the bfloat16 weight), the baseline; ignores
    `importance`."""
    return mx.quantize(x.astype(mx.bfloat16), group_size=group_size, bits=bits, mode="affine")
