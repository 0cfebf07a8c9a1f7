"""Rotary embedding as one kernel launch: x [..., L, (H,) D] with its last `dims` dims rotated in interleaved
pairs by position * frequency, the other dims copied.

One thread per pair of dims: the angle position * frequency in fp32 (as the reference computes it), its cosine
and sine, (re cos - im sin, im cos + re sin) in fp32 (the inverse rotation: the sine's sign flipped), rounded
once to x's dtype. The pure-MLX reference (layers/rope.py) is ~7 launching ops per call even when compiled
(angles, cos, sin, the sign, the rotation, the concatenation with the unrotated dims), and a decode step rotates
three to six times per layer, so this is mostly a cut in the host's per-op work. The cosine and sine are the
backend's fp32 functions, which may differ from MLX's in the last bit: outputs agree with the reference to a
rounding flip of x's dtype.
"""

from typing import Callable

import mlx.core as mx

from . import backend

FLOATS = (mx.float32, mx.bfloat16, mx.float16)

_BODY = """
constexpr uint PAIRS = uint(D) / 2u, FIRST = uint(D - DIMS) / 2u;  // pairs per row; the first rotated pair
const uint index = GROUP_X * NTHREADS + TID;
const uint row = index / PAIRS, pair = index % PAIRS, at = row * uint(D) + 2u * pair;
const float re = static_cast<float>(x[at]), im = static_cast<float>(x[at + 1u]);
if (pair < FIRST) {
  y[at] = x[at];
  y[at + 1u] = x[at + 1u];
  return;
}
// positions: one per row of heads (the wrapper repeats them per batch)
const float angle = float(positions[row / uint(HEADS)]) * dim_freq[2u * (pair - FIRST)];
const float c = COS(angle), s = INVERSE ? -SIN(angle) : SIN(angle);
y[at] = static_cast<T>(re * c - im * s);
y[at + 1u] = static_cast<T>(im * c + re * s);
"""

KERNEL = backend.kernel("rope", ["x", "positions", "dim_freq"], ["y"], _BODY)


def rotate(x: mx.array, positions: mx.array, dim_freq: mx.array, inverse: bool,
           reference: Callable[[], mx.array]) -> mx.array:
    """x [..., L, D] or [B, L, H, D] (4 dims: the heads share their position), positions [L] int, dim_freq [dims]
    fp32 (each pair's frequency, repeated) -> x rotated as `reference()`."""
    dims, width = dim_freq.shape[0], x.shape[-1]
    heads = x.shape[-2] if x.ndim == 4 else 1
    rows = x.size // width
    threads = rows * width // 2  # one per pair of dims
    if (backend.backend() is None or x.dtype not in FLOATS or x.size == 0 or x.size >= 2**31 or dims % 2
            or width % 2 or dims > width or threads % 32 or positions.shape != (x.shape[-3 if x.ndim == 4 else -2],)):
        return reference()
    group = next(g for g in (256, 128, 64, 32) if threads % g == 0)
    leading = rows // (heads * positions.shape[0])  # batch (and any other leading axes): same positions each
    positions = mx.tile(positions.astype(mx.int32), leading) if leading > 1 else positions.astype(mx.int32)
    template = [("T", x.dtype), ("D", width), ("DIMS", dims), ("HEADS", heads), ("INVERSE", int(inverse))]
    return KERNEL.run([x, positions, dim_freq], template, grid=(threads, 1, 1),
                      threadgroup=(group, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype],
                      reference=lambda: [reference()])[0]
