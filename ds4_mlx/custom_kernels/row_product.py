"""fp32 products of a few rows with unquantized weights, as one kernel launch: y = float(x) @ float(w)^T.

The official code computes the MoE gate's logits and the compressors' kv and scores in fp32 from bf16 weights.
The pure-MLX form (x and the weights converted to fp32, then a product; the compressor's scores plus the
position bias) is three to six launching ops per call and converts the whole weight every decode step. Here
one SIMD group computes one output column for every row: its lanes stride over the width, reading each weight
once in its own dtype, and the lanes' fp32 partial sums are added by a SIMD sum. `pair` computes the
compressor's two products (kv, and score plus its bias row) in the same launch. Sums are fp32 in another order
than MLX's product: results agree with the reference to fp32 rounding.
"""

from typing import Callable, List, Tuple

import mlx.core as mx

from . import backend

MAX_ROWS = 8  # decode-sized: up to this many rows (more: the reference)

# one SIMD group per output column n of matrix m (columns of all matrices numbered in one range)
_BODY = """
const uint column = GROUP_X * (NTHREADS / 32u) + WARP;
const uint m = column / uint(N), n = column % uint(N);
float sums[ROWS];
for (int r = 0; r < ROWS; ++r) sums[r] = 0.0f;
for (uint k = LANE; k < uint(K); k += 32u) {
  const float weight = static_cast<float>(@WEIGHT@);
  for (int r = 0; r < ROWS; ++r) sums[r] += static_cast<float>(x[uint(r) * uint(K) + k]) * weight;
}
for (int r = 0; r < ROWS; ++r) {
  const float total = WARP_SUM(sums[r]);
@STORE@
}
"""

_SINGLE = {"WEIGHT": "w[n * uint(K) + k]", "STORE": "  if (LANE == 0u) y[uint(r) * uint(N) + n] = total;"}
_PAIR = {"WEIGHT": "m == 0u ? w1[n * uint(K) + k] : w2[n * uint(K) + k]",
         "STORE": """  if (LANE == 0u) {
    if (m == 0u) y1[uint(r) * uint(N) + n] = total;
    else y2[uint(r) * uint(N) + n] = total + bias[uint(r) * uint(N) + n];
  }"""}

SINGLE = backend.kernel("row_product", ["x", "w"], ["y"], backend.fill(_BODY, **_SINGLE))
PAIR = backend.kernel("row_product_pair", ["x", "w1", "w2", "bias"], ["y1", "y2"], backend.fill(_BODY, **_PAIR))


def _applies(x: mx.array, weights) -> bool:
    rows = x.size // max(x.shape[-1], 1)
    return (backend.backend() is not None and 0 < rows <= MAX_ROWS and x.dtype in backend.FLOATS
            and all(w.ndim == 2 and w.dtype in backend.FLOATS and w.shape == weights[0].shape for w in weights)
            and x.shape[-1] == weights[0].shape[1])


def _launch(kernel, x: mx.array, inputs: List[mx.array], count: int, n: int, reference) -> List[mx.array]:
    rows, k = x.size // x.shape[-1], x.shape[-1]
    warps = next(w for w in (8, 4, 2, 1) if (count * n) % w == 0)
    out = kernel.run([x.reshape(rows, k), *inputs], [("K", k), ("N", n), ("ROWS", rows)],
                     grid=(count * n * 32, 1, 1), threadgroup=(32 * warps, 1, 1),
                     output_shapes=[(rows, n)] * count, output_dtypes=[mx.float32] * count,
                     reference=lambda: [y.reshape(rows, n) for y in reference()])
    return [y.reshape(*x.shape[:-1], n) for y in out]


def single(x: mx.array, w: mx.array, reference: Callable[[], mx.array]) -> mx.array:
    """x [..., K], w [N, K] -> fp32 [..., N] = x @ w^T in fp32, as `reference()`."""
    if not _applies(x, [w]):
        return reference()
    return _launch(SINGLE, x, [w], 1, w.shape[0], lambda: [reference()])[0]


def pair(x: mx.array, w1: mx.array, w2: mx.array, bias: mx.array,
         reference: Callable[[], Tuple[mx.array, mx.array]]) -> Tuple[mx.array, mx.array]:
    """x [..., K], w1 and w2 [N, K], bias fp32 of the outputs' shape [..., N] -> (x @ w1^T, x @ w2^T + bias) in
    fp32, as `reference()`."""
    if not _applies(x, [w1, w2]) or bias.dtype != mx.float32 or bias.shape != (*x.shape[:-1], w1.shape[0]):
        return reference()
    bias = bias.reshape(-1, w1.shape[0])
    return tuple(_launch(PAIR, x, [w1, w2, bias], 2, w1.shape[0], lambda: list(reference())))
