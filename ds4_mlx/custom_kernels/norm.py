"""RMSNorm as one kernel launch: y = x * rsqrt(mean(x^2) + eps) * weight, in fp32, rounded once to x's dtype.

One thread group per row: each thread keeps its share of the row in registers as fp32, the sum of squares is
reduced over the group (SIMD sums, then the groups' partials in order), and each thread writes its share. The
reference (layers/numerics.py, RMSNorm) converts x and the weight to fp32 for MLX's rms_norm and the result
back: four launching ops per norm, and a decode step has four to five norms per layer. The fp32 sum is added in
another order than MLX's, so outputs agree with the reference to a rounding flip of x's dtype.

`rms_norm_rope` makes KV rows in one launch (layers/numerics.py, kv_rows): the norm, the RoPE of the last dims
(custom_kernels/rope.py's arithmetic) and the FP8 KV round trip of the others (custom_kernels/rounding.py's),
where the reference is a norm, a RoPE and a round trip (three launches with the kernels, ~15 ops without).
"""

from typing import Callable, Optional, Tuple

import mlx.core as mx

from . import backend, rounding
from .rope import LOAD_PAIRS, ROTATE, pair_threads, row_positions

MAX_PER_THREAD = 16  # row elements per thread (rows up to 16 x 256 = 4096 wide; wider: the reference)

# the sum of the threads' squares over the group, then `scale` = rsqrt(mean + eps)
_REDUCE = backend.GROUP_SUM + """
const float scale = RSQRT(total / float(D) + eps[0]);
"""

_BODY = """
constexpr int PER = D / NT;
SHARED float partials[NT / 32];
const uint first = GROUP_X * uint(D);
float v[PER];
float squares = 0.0f;
for (int j = 0; j < PER; ++j) {
  v[j] = static_cast<float>(x[first + TID + uint(NT * j)]);
  squares += v[j] * v[j];
}
""" + _REDUCE + """
for (int j = 0; j < PER; ++j) {
  const uint at = TID + uint(NT * j);
  y[first + at] = static_cast<T>((v[j] * scale) * static_cast<float>(weight[at]));
}
"""

# rms_norm_rope: each thread PP pairs of the row (pairs TID + NT * j); the normed row rounded to T, its last DIMS
# dims rotated as custom_kernels/rope.py does, and with FP8 the other dims' blocks of 64 (32 pairs: one SIMD
# group) round-tripped through e4m3 as custom_kernels/rounding.py does (eps[1..3]: 1 / 448, amax floor, 448)
_ROPE_BODY = LOAD_PAIRS + """
for (int j = 0; j < 2 * PP; ++j) squares += v[j] * v[j];
""" + _REDUCE + """
const float position = float(positions[row]);
for (int j = 0; j < PP; ++j) {
  const uint pair = TID + uint(NT * j), at = base + 2u * pair;
  const float wa = static_cast<float>(weight[2u * pair]), wb = static_cast<float>(weight[2u * pair + 1u]);
  const float re = static_cast<float>(static_cast<T>((v[2 * j] * scale) * wa));
  const float im = static_cast<float>(static_cast<T>((v[2 * j + 1] * scale) * wb));
  if (pair >= FIRST) {
""" + ROTATE + """
  } else if (FP8) {
    const float amax = FMAX(WARP_MAX(FMAX(re < 0.0f ? -re : re, im < 0.0f ? -im : im)), eps[2]);
    const float block_scale = k_pow2(k_ceil_log2(amax * eps[1]));
    y[at] = static_cast<T>(k_e4m3(FMIN(FMAX(re / block_scale, -eps[3]), eps[3])) * block_scale);
    y[at + 1u] = static_cast<T>(k_e4m3(FMIN(FMAX(im / block_scale, -eps[3]), eps[3])) * block_scale);
  } else {
    y[at] = static_cast<T>(re);
    y[at + 1u] = static_cast<T>(im);
  }
}
"""

KERNEL = backend.kernel("rms_norm", ["x", "weight", "eps"], ["y"], _BODY)
ROPE = backend.kernel("rms_norm_rope", ["x", "weight", "eps", "positions", "dim_freq"], ["y"], _ROPE_BODY,
                      rounding.HEADER)


def rms_norm(x: mx.array, weight: mx.array, eps: float, reference: Callable[[], mx.array]) -> mx.array:
    """x [..., D], weight [D] -> the RMS-normalised x times weight in x's dtype, as `reference()`."""
    width = x.shape[-1]
    threads = next((t for t in (256, 128, 64, 32) if width % t == 0 and width // t >= 2), 32)
    if (backend.backend() is None or x.dtype not in backend.FLOATS or weight.dtype not in backend.FLOATS or x.size == 0
            or x.size >= 2**31 or width % threads or width // threads > MAX_PER_THREAD):
        return reference()
    template = [("T", x.dtype), ("D", width), ("NT", threads)]
    return KERNEL.run([x, weight, backend.float_input(eps)], template, grid=(x.size // width * threads, 1, 1),
                      threadgroup=(threads, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype],
                      reference=lambda: [reference()])[0]


def rms_norm_rope(x: mx.array, weight: mx.array, eps: float, positions: mx.array, dim_freq: mx.array,
                  fp8: Optional[Tuple[float, float]], reference: Callable[[], mx.array]) -> mx.array:
    """x [B, L, D] -> RMSNorm (weight [D]) then RoPE on the last len(dim_freq) dims at positions [L], then, with
    `fp8` = (e4m3 max, amax floor), the FP8 KV round trip of the other dims (blocks of 64): one launch for the
    layers' `fp8_kv(rope(norm(x)))`, as `reference()`."""
    width, dims = x.shape[-1], dim_freq.shape[0]
    threads = pair_threads(width)
    if (backend.backend() is None or x.dtype not in backend.FLOATS or weight.dtype not in backend.FLOATS or x.ndim != 3
            or x.size == 0 or x.size >= 2**31 or dims % 2 or dims > width or threads is None
            or positions.shape != (x.shape[1],) or (fp8 is not None and (width - dims) % 64)):
        return reference()
    rows = x.size // width
    fmt_max, amax_floor = fp8 if fp8 is not None else (1.0, 0.0)
    params = backend.float_input(eps, 1.0 / fmt_max, amax_floor, fmt_max)
    template = [("T", x.dtype), ("D", width), ("DIMS", dims), ("NT", threads), ("FP8", int(fp8 is not None))]
    return ROPE.run([x, weight, params, row_positions(positions, rows, 1), dim_freq], template,
                    grid=(rows * threads, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[x.shape],
                    output_dtypes=[x.dtype], reference=lambda: [reference()])[0]
