"""The official code's block-scaled low-precision round trips (FP8 e4m3, FP4 e2m1) as one kernel launch.

Each 32-lane SIMD group takes one block of a row: the block's largest magnitude (a warp maximum, with the
format's floor), the power-of-two scale 2^ceil(log2(amax / fmt_max)), then each value divided by it, clipped,
rounded to the format's grid (nearest, ties to even) and multiplied back, in the input dtype. Columns from
`rounded` on (fp8_kv's RoPE dims) are copied unchanged. The pure-MLX reference (layers/numerics.py,
`_block_round_trip`) is ~12 graph ops per call, and a decode step has several calls per layer (FP8 inputs of
the attention and MoE products, FP8 KV, the indexer's FP4 queries), so the kernel is mostly a cut in the
host's per-op work. Results are the reference's bit for bit.
"""

from typing import Callable, Optional

import mlx.core as mx

from . import backend

FORMATS = {"e4m3": 0, "e2m1": 1}
MAX_WARPS = 8  # blocks per thread group

# e4m3 / e2m1 rounding helpers (also used by custom_kernels/norm.py)
HEADER = """
INLINE float k_pow2(int e) { return AS_FLOAT(uint(e + 127) << 23); }  // e in [-126, 127]
INLINE int k_ceil_log2(float a) {  // positive normal a
  const uint bits = AS_UINT(a);
  return int(bits >> 23) - 127 + ((bits & 0x7fffffu) != 0u ? 1 : 0);
}
INLINE float k_e4m3(float y) {  // |y| <= 448: 3 mantissa bits, subnormal steps of 2^-9 below 2^-6
  const float a = y < 0.0f ? -y : y;
  if (a < 0.015625f) return RINT(y * 512.0f) * 0.001953125f;
  const float quantum = k_pow2(int(AS_UINT(a) >> 23) - 130);
  return RINT(y / quantum) * quantum;
}
INLINE float k_e2m1(float y) {  // |y| <= 6: steps of 0.5 below 2, 1 below 4, 2 above
  const float a = y < 0.0f ? -y : y;
  const float quantum = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
  return RINT(y / quantum) * quantum;
}
"""

_BODY = """
constexpr int PER = BLOCK / 32;
constexpr int BLOCKS_PER_ROW = ROUNDED / BLOCK;
const uint block = GROUP_X * (NTHREADS / 32u) + WARP;
const uint row = block / uint(BLOCKS_PER_ROW);
const uint first = row * uint(WIDTH) + (block % uint(BLOCKS_PER_ROW)) * uint(BLOCK);
float v[PER];
float amax = 0.0f;
for (int j = 0; j < PER; ++j) {
  v[j] = static_cast<float>(x[first + LANE + 32u * uint(j)]);
  amax = FMAX(amax, v[j] < 0.0f ? -v[j] : v[j]);
}
const float inv_max = params[0], floor_amax = params[1], fmt_max = params[2];
amax = FMAX(WARP_MAX(amax), floor_amax);
const float scale = k_pow2(k_ceil_log2(amax * inv_max));
for (int j = 0; j < PER; ++j) {
  const float y = FMIN(FMAX(v[j] / scale, -fmt_max), fmt_max);
  const float r = FMT == 0 ? k_e4m3(y) : k_e2m1(y);
  y_out[first + LANE + 32u * uint(j)] = static_cast<T>(r * scale);
}
if (block % uint(BLOCKS_PER_ROW) == uint(BLOCKS_PER_ROW - 1)) {  // the row's last block copies the rest
  for (uint c = uint(ROUNDED) + LANE; c < uint(WIDTH); c += 32u)
    y_out[row * uint(WIDTH) + c] = x[row * uint(WIDTH) + c];
}
"""

KERNEL = backend.kernel("block_round_trip", ["x", "params"], ["y_out"], _BODY, HEADER)  # params: 1 / max, floor, max


def block_round_trip(x: mx.array, block: int, fmt: str, fmt_max: float, amax_floor: float,
                     reference: Callable[[], mx.array], rounded: Optional[int] = None) -> mx.array:
    """x [..., W] -> x with its first `rounded` columns (default all) round-tripped through `fmt` in blocks of
    `block` (a multiple of 32 dividing `rounded`) and the rest unchanged, as `reference()`."""
    width = x.shape[-1]
    rounded = width if rounded is None else rounded
    if (backend.backend() is None or x.dtype not in backend.FLOATS or x.size == 0 or block % 32 or rounded % block
            or rounded > width or x.size >= 2**31):
        return reference()
    blocks = x.size // width * (rounded // block)
    warps = next(w for w in (MAX_WARPS, 4, 2, 1) if blocks % w == 0)
    template = [("T", x.dtype), ("BLOCK", block), ("WIDTH", width), ("ROUNDED", rounded), ("FMT", FORMATS[fmt])]
    return KERNEL.run([x, backend.float_input(1.0 / fmt_max, amax_floor, fmt_max)], template, grid=(blocks * 32, 1, 1),
                      threadgroup=(32 * warps, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype],
                      reference=lambda: [reference()])[0]
