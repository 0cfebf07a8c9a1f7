"""Rotary embedding as one kernel launch: x [..., L, (H,) D] with its last `dims` dims rotated in interleaved
pairs by position * frequency, the other dims copied.

One thread per pair of dims: the angle position * frequency in fp32 (as the reference computes it), its cosine
and sine, (re cos - im sin, im cos + re sin) in fp32 (the inverse rotation: the sine's sign flipped), rounded
once to x's dtype. The pure-MLX reference (layers/rope.py) is ~7 launching ops per call even when compiled
(angles, cos, sin, the sign, the rotation, the concatenation with the unrotated dims), and a decode step rotates
three to six times per layer, so this is mostly a cut in the host's per-op work. The cosine and sine are the
backend's fp32 functions, which may differ from MLX's in the last bit: outputs agree with the reference to a
rounding flip of x's dtype.

`head_norm_rotate` puts the attention queries' weightless head norm in front (one thread group per head row,
the official roundings to the activation dtype at every step), replacing its ~3 launching ops and the RoPE's.
"""

from typing import Callable

import mlx.core as mx

from . import backend

# kernel source: pair `pair` of a row (at `at` in y; its values re and im as floats) rotated by `position` times the
# pair's frequency (@SIGN@: the sine's sign, for the inverse rotation), rounded to T
_ROTATE = """
const float angle = position * dim_freq[2u * (pair - FIRST)];
const float c = COS(angle), s = @SIGN@SIN(angle);
y[at] = static_cast<T>(re * c - im * s);
y[at + 1u] = static_cast<T>(im * c + re * s);
"""
ROTATE = backend.fill(_ROTATE, SIGN="")

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
const float position = float(positions[row / uint(HEADS)]);  // one per row of heads (repeated per batch)
""" + backend.fill(_ROTATE, SIGN="(INVERSE ? -1.0f : 1.0f) * ")

# kernel source: one thread group of NT threads per row of D (GROUP_X), each thread PP pairs of it (pairs TID + NT *
# j) loaded as floats into v[2 * PP]; FIRST: the first rotated pair
LOAD_PAIRS = """
constexpr int PP = D / 2 / NT;
constexpr uint FIRST = uint(D - DIMS) / 2u;
SHARED float partials[NT / 32];
const uint row = GROUP_X, base = row * uint(D);
float v[2 * PP];
for (int j = 0; j < PP; ++j) {
  const uint at = base + 2u * (TID + uint(NT * j));
  v[2 * j] = static_cast<float>(x[at]);
  v[2 * j + 1] = static_cast<float>(x[at + 1u]);
}
float squares = 0.0f;
"""

# head_norm_rope: one thread group per head row, each thread PP pairs of it; the official weightless head norm
# with its roundings to the activation dtype at every step (q * q, their fp32 mean, + eps, the rsqrt, q times
# it), then the rotation of the normalised row as above
_NORMED_BODY = LOAD_PAIRS + """
for (int j = 0; j < 2 * PP; ++j) squares += static_cast<float>(static_cast<T>(v[j] * v[j]));
""" + backend.GROUP_SUM + """
const float mean = static_cast<float>(static_cast<T>(total / float(D)));
const float shifted = static_cast<float>(static_cast<T>(mean + static_cast<float>(static_cast<T>(eps[0]))));
const float scale = static_cast<float>(static_cast<T>(RSQRT(shifted)));
const float position = float(positions[row / uint(HEADS)]);
for (int j = 0; j < PP; ++j) {
  const uint pair = TID + uint(NT * j), at = base + 2u * pair;
  const float re = static_cast<float>(static_cast<T>(v[2 * j] * scale));
  const float im = static_cast<float>(static_cast<T>(v[2 * j + 1] * scale));
  if (pair < FIRST) {
    y[at] = static_cast<T>(re);
    y[at + 1u] = static_cast<T>(im);
  } else {
""" + ROTATE + """
  }
}
"""

KERNEL = backend.kernel("rope", ["x", "positions", "dim_freq"], ["y"], _BODY)
NORMED = backend.kernel("head_norm_rope", ["x", "positions", "dim_freq", "eps"], ["y"], _NORMED_BODY)


def pair_threads(width: int):
    """Threads per group for LOAD_PAIRS rows `width` wide (a whole number of SIMD groups, up to 8 pairs each), or
    None where such rows do not fit."""
    threads = next((t for t in (256, 128, 64, 32) if (width // 2) % t == 0), None)
    return threads if threads is not None and width % 2 == 0 and width // 2 // threads <= 8 else None


def row_positions(positions: mx.array, rows: int, heads: int) -> mx.array:
    """positions [L] as int32, repeated for each batch row (and any other leading axis) of `rows` rows of heads."""
    leading = rows // (heads * positions.shape[0])
    return mx.tile(positions.astype(mx.int32), leading) if leading > 1 else positions.astype(mx.int32)


def rotate(x: mx.array, positions: mx.array, dim_freq: mx.array, inverse: bool,
           reference: Callable[[], mx.array]) -> mx.array:
    """x [..., L, D] or [B, L, H, D] (4 dims: the heads share their position), positions [L] int, dim_freq [dims]
    fp32 (each pair's frequency, repeated) -> x rotated as `reference()`."""
    dims, width = dim_freq.shape[0], x.shape[-1]
    heads = x.shape[-2] if x.ndim == 4 else 1
    rows = x.size // width
    threads = rows * width // 2  # one per pair of dims
    if (backend.backend() is None or x.dtype not in backend.FLOATS or x.size == 0 or x.size >= 2**31 or dims % 2
            or width % 2 or dims > width or threads % 32 or positions.shape != (x.shape[-3 if x.ndim == 4 else -2],)):
        return reference()
    group = next(g for g in (256, 128, 64, 32) if threads % g == 0)
    template = [("T", x.dtype), ("D", width), ("DIMS", dims), ("HEADS", heads), ("INVERSE", int(inverse))]
    return KERNEL.run([x, row_positions(positions, rows, heads), dim_freq], template, grid=(threads, 1, 1),
                      threadgroup=(group, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype],
                      reference=lambda: [reference()])[0]


def head_norm_rotate(x: mx.array, positions: mx.array, dim_freq: mx.array, eps: float,
                     reference: Callable[[], mx.array]) -> mx.array:
    """x [B, L, H, D] -> each head row normalised with the official roundings and rotated, as
    `reference()` (layers/attention.py: head_rms_norm, then the RoPE)."""
    dims, width = dim_freq.shape[0], x.shape[-1]
    threads = pair_threads(width)
    if (backend.backend() is None or x.dtype not in backend.FLOATS or x.ndim != 4 or x.size == 0 or x.size >= 2**31
            or dims % 2 or dims > width or threads is None or positions.shape != (x.shape[1],)):
        return reference()
    rows = x.size // width
    template = [("T", x.dtype), ("D", width), ("DIMS", dims), ("HEADS", x.shape[2]), ("NT", threads)]
    return NORMED.run([x, row_positions(positions, rows, x.shape[2]), dim_freq, backend.float_input(eps)], template,
                      grid=(rows * threads, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[x.shape],
                      output_dtypes=[x.dtype], reference=lambda: [reference()])[0]
