"""RMSNorm as one kernel launch: y = x * rsqrt(mean(x^2) + eps) * weight, in fp32, rounded once to x's dtype.

One thread group per row: each thread keeps its share of the row in registers as fp32, the sum of squares is
reduced over the group (SIMD sums, then the groups' partials in order), and each thread writes its share. The
reference (layers/numerics.py, RMSNorm) converts x and the weight to fp32 for MLX's rms_norm and the result
back: four launching ops per norm, and a decode step has four to five norms per layer. The fp32 sum is added in
another order than MLX's, so outputs agree with the reference to a rounding flip of x's dtype.
"""

from typing import Callable

import mlx.core as mx

from . import backend

FLOATS = (mx.float32, mx.bfloat16, mx.float16)
MAX_PER_THREAD = 16  # row elements per thread (rows up to 16 x 256 = 4096 wide; wider: the reference)

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
squares = WARP_SUM(squares);
if (LANE == 0u) partials[WARP] = squares;
BARRIER();
float total = 0.0f;
for (int w = 0; w < NT / 32; ++w) total += partials[w];
const float scale = RSQRT(total / float(D) + eps[0]);
for (int j = 0; j < PER; ++j) {
  const uint at = TID + uint(NT * j);
  y[first + at] = static_cast<T>((v[j] * scale) * static_cast<float>(weight[at]));
}
"""

KERNEL = backend.kernel("rms_norm", ["x", "weight", "eps"], ["y"], _BODY)


def rms_norm(x: mx.array, weight: mx.array, eps: float, reference: Callable[[], mx.array]) -> mx.array:
    """x [..., D], weight [D] -> the RMS-normalised x times weight in x's dtype, as `reference()`."""
    width = x.shape[-1]
    threads = next((t for t in (256, 128, 64, 32) if width % t == 0 and width // t >= 2), 32)
    if (backend.backend() is None or x.dtype not in FLOATS or weight.dtype not in FLOATS or x.size == 0
            or x.size >= 2**31 or width % threads or width // threads > MAX_PER_THREAD):
        return reference()
    template = [("T", x.dtype), ("D", width), ("NT", threads)]
    return KERNEL.run([x, weight, backend.float_input(eps)], template, grid=(x.size // width * threads, 1, 1),
                      threadgroup=(threads, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype],
                      reference=lambda: [reference()])[0]
