"""Routed experts for prefill (many tokens) on CUDA: grouped matrix products on the tensor cores,
reading the quantized experts directly.

MLX 0.32.4's CUDA `gather_qmm` runs affine-quantized experts at a few TFLOP/s when many rows share each
expert (an H100 does ~790 TFLOP/s of bf16 products). Here the N * k token-expert rows are sorted by
expert (`layers.moe.sort_by_expert`) and cut into tiles of up to BM rows of one expert; two launches
follow:
- `moe_prefill_gate_up`, grid (INTER / BN, tiles): a group computes a BM x BN tile of both the gate (w1)
  and the up (w3) products of its expert's rows, then the clamped SwiGLU times the route weight,
  written in the activation dtype: hidden [R, INTER].
- `moe_prefill_down`, grid (DIM / BN, tiles): the same for w2 on the hidden rows: [R, DIM].
Each K step (BK = 64 columns) the group copies its rows' activations into shared memory and decodes
the BN x BK weight slice of each matrix (w = s * q + b per group, affine 2/4/8-bit) into shared memory
in the activation dtype; four warps then multiply 16 x 16 x 16 fragments (nvcuda::wmma, fp32
accumulators), each warp a 32 x 32 quarter of the tile. A group finds its expert by binary search over
the experts' first tiles (`tile_starts`), so the grid is sized without reading the routing on the host.

Numerics, against the reference: the decoded weights are rounded to the activation dtype (relative 2^-9
in bf16) before the product, where gather_qmm uses them unrounded; the gate, up and down products are
rounded to the activation dtype, and the SwiGLU computed in fp32, as the reference does; fp32 sums in
another order. Activations other than bf16/fp16, other quantization modes (mxfp4: MLX's gather_qmm
already runs it at ~19 TFLOP/s), Metal (MLX's Metal gather_qmm) and the CPU take the reference.
Scratch memory: the sorted rows, hidden [R, INTER] and the down output [R, DIM], nothing per expert.
"""

import mlx.core as mx

from . import backend
from ..layers import moe as layer

PREFILL_ROWS = 1024  # token-expert rows from which prefill takes this path
BM, BN, BK, THREADS = 64, 64, 64, 128  # tile rows, tile columns, K step, threads (4 warps of 32 x 32)
LDA = BK + 8  # shared row strides in elements (padded: fewer bank conflicts; wmma needs multiples of 8)
LDC = BN + 4
ACTIVATIONS = (mx.bfloat16, mx.float16)

_HEADER = """
#ifndef K_HOST_STUB
#include <mma.h>
#endif
namespace wmma = nvcuda::wmma;
"""

_BODY = """
constexpr int PER_WORD = 32 / BITS;
constexpr uint MASK = (1u << BITS) - 1u;
constexpr int WORDS = K / PER_WORD;  // packed words per weight row
constexpr int GROUPS = K / GS;  // scales per weight row
constexpr int KW = BK / PER_WORD;  // words per weight row in one K step
const int tile = int(GROUP_Y);
if (tile >= tile_starts[E]) return;
int lo = 0, hi = E;  // the expert e with tile_starts[e] <= tile < tile_starts[e + 1]
while (hi - lo > 1) {
  const int mid = (lo + hi) >> 1;
  if (tile_starts[mid] <= tile) lo = mid; else hi = mid;
}
const int e = lo;
const int r0 = row_starts[e] + (tile - tile_starts[e]) * BM;
const int rows = min(BM, row_starts[e + 1] - r0);
const int n0 = int(GROUP_X) * BN;
// shared: the activations' K slice [BM][LDA] and each matrix's decoded slice [BN][LDA] (wmma's
// column-major B), later reused for the fp32 results [MATS][BM][LDC]
SHARED __align__(32) float smem[SMEM_FLOATS];
T* a_tile = reinterpret_cast<T*>(smem);
T* b_tile = a_tile + BM * LDA;
const int wm = int(WARP) >> 1, wn = int(WARP) & 1;  // this warp's 32 x 32 quarter
wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[MATS][2][2];
for (int m = 0; m < MATS; ++m)
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[m][i][j], 0.0f);
for (int k0 = 0; k0 < K; k0 += BK) {
  BARRIER();
  for (int v = int(TID); v < BM * BK / 8; v += NT) {  // 8 activations (16 bytes) per copy
    const int m = v / (BK / 8), kk = (v % (BK / 8)) * 8;
    uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
    if (m < rows) chunk = *reinterpret_cast<const uint4*>(x + size_t(r0 + m) * K + k0 + kk);
    *reinterpret_cast<uint4*>(a_tile + m * LDA + kk) = chunk;
  }
  for (int v = int(TID); v < BN * KW; v += NT) {
    const int n = v / KW, wd = v % KW;
    const size_t row = size_t(e) * N + n0 + n;
    const int kk = wd * PER_WORD;
    const int g = (k0 + kk) / GS;
@DECODE@
  }
  BARRIER();
  for (int kk = 0; kk < BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_tile + (wm * 32 + i * 16) * LDA + kk, LDA);
    for (int m = 0; m < MATS; ++m)
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, b_tile + (m * BN + wn * 32 + j * 16) * LDA + kk, LDA);
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[m][i][j], a[i], b, acc[m][i][j]);
      }
  }
}
BARRIER();
float* c_tile = smem;
for (int m = 0; m < MATS; ++m)
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c_tile + (m * BM + wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[m][i][j], LDC,
                              wmma::mem_row_major);
BARRIER();
for (int v = int(TID); v < BM * BN; v += NT) {
  const int m = v / BN, n = v % BN;
  if (m < rows) {
@EPILOGUE@
  }
}
"""

_DECODE = """    {
    const uint word = @W@[row * WORDS + k0 / PER_WORD + wd];
    const float s = static_cast<float>(@S@[row * GROUPS + g]), b = static_cast<float>(@B@[row * GROUPS + g]);
    T* dst = b_tile + (@M@ * BN + n) * LDA + kk;
    for (int j = 0; j < PER_WORD; ++j) dst[j] = static_cast<T>(s * float((word >> (j * BITS)) & MASK) + b);
    }"""

_GATE_UP_EPILOGUE = """    // the reference's gate / up products come out of the quantized matmul in the activation dtype
    float gv = static_cast<float>(static_cast<T>(c_tile[m * LDC + n]));
    float uv = static_cast<float>(static_cast<T>(c_tile[(BM + m) * LDC + n]));
    const float limit = params[0];
    if (limit > 0.0f) {
      gv = FMIN(gv, limit);
      uv = FMAX(FMIN(uv, limit), -limit);
    }
    const float h = ((gv * (1.0f / (1.0f + EXP(-gv)))) * uv) * route[r0 + m];
    y[size_t(r0 + m) * N + n0 + n] = static_cast<T>(h);"""

_DOWN_EPILOGUE = """    y[size_t(r0 + m) * N + n0 + n] = static_cast<T>(c_tile[m * LDC + n]);"""


def _decode(matrices) -> str:
    return "\n".join(backend.fill(_DECODE, W=f"w{m}", S=f"s{m}", B=f"b{m}", M=str(i)) for i, m in enumerate(matrices))


GATE_UP = backend.kernel(
    "moe_prefill_gate_up", ["x", "w1", "s1", "b1", "w3", "s3", "b3", "row_starts", "tile_starts", "route", "params"],
    ["y"], backend.fill(_BODY, DECODE=_decode((1, 3)), EPILOGUE=_GATE_UP_EPILOGUE), _HEADER, backends=("cuda",))
DOWN = backend.kernel(
    "moe_prefill_down", ["x", "w2", "s2", "b2", "row_starts", "tile_starts"],
    ["y"], backend.fill(_BODY, DECODE=_decode((2,)), EPILOGUE=_DOWN_EPILOGUE), _HEADER, backends=("cuda",))


def _affine(linear) -> bool:
    return (getattr(linear, "mode", None) == "affine" and getattr(linear, "biases", None) is not None
            and getattr(linear, "global_scale", None) is None and "bias" not in linear
            and linear.bits in (2, 4, 8) and linear.group_size >= 32 // linear.bits)


def applies(x: mx.array, indices: mx.array, w1, w2, w3) -> bool:
    """bf16/fp16 activations, affine-quantized stacked experts whose sizes are whole tiles, and at
    least PREFILL_ROWS token-expert rows."""
    if x.ndim != 2 or indices.ndim != 2 or indices.size < PREFILL_ROWS or x.dtype not in ACTIVATIONS:
        return False
    if not all(_affine(w) for w in (w1, w2, w3)):
        return False
    experts, inter = w1.weight.shape[:2]
    dim = x.shape[1]
    return all(size % 64 == 0 for size in (dim, inter)) and w2.weight.shape[:2] == (experts, dim)


def _tiles(sorted_experts: mx.array, experts: int):
    """(row_starts [E + 1]: each expert's first sorted row, tile_starts [E + 1]: its first tile), int32."""
    bounds = mx.arange(experts + 1, dtype=sorted_experts.dtype)
    row_starts = mx.sum(sorted_experts[None] < bounds[:, None], axis=1).astype(mx.int32)
    tiles = (row_starts[1:] - row_starts[:-1] + BM - 1) // BM
    return row_starts, mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(tiles)]).astype(mx.int32)


def _product(kernel, x, linears, out_dims, row_starts, tile_starts, extra, reference):
    """One grouped launch: x [R, K] through `linears` (w1 and w3, or w2) -> [R, out_dims] in x's dtype."""
    (rows, k), first = x.shape, linears[0]
    experts = first.weight.shape[0]
    tiles = -(-rows // BM) + experts  # at most one partial tile per expert
    smem = max(BM * LDA + len(linears) * BN * LDA, 2 * len(linears) * BM * LDC) // 2
    inputs = [x] + [a for w in linears for a in (w.weight, w.scales, w.biases)] + [row_starts, tile_starts] + extra
    return kernel.run(
        inputs, [("T", x.dtype), ("BITS", first.bits), ("GS", first.group_size), ("K", k), ("N", out_dims),
                 ("E", experts), ("MATS", len(linears)), ("BM", BM), ("BN", BN), ("BK", BK), ("LDA", LDA),
                 ("LDC", LDC), ("NT", THREADS), ("SMEM_FLOATS", smem)],
        grid=(out_dims // BN * THREADS, tiles, 1), threadgroup=(THREADS, 1, 1), output_shapes=[(rows, out_dims)],
        output_dtypes=[x.dtype], reference=reference)[0]


def routed_experts(x: mx.array, weights: mx.array, indices: mx.array, w1, w2, w3, limit: float,
                   fp8_activations: bool) -> mx.array:
    """x [N, dim], route weights / expert indices [N, k] -> sum over k of weight * expert(x), fp32 [N, dim]."""
    order, experts, rows, route = layer.sort_by_expert(x, weights, indices)
    rows = rows.reshape(rows.shape[0], -1)
    row_starts, tile_starts = _tiles(experts, w1.weight.shape[0])
    inter, dim = w1.weight.shape[1], x.shape[1]

    def gate_up_reference():
        gate = w1(rows[:, None], experts, sorted_indices=True)
        up = w3(rows[:, None], experts, sorted_indices=True)
        return [layer.expert_hidden(gate, up, route, limit, x.dtype, False).reshape(-1, inter)]

    hidden = _product(GATE_UP, rows, (w1, w3), inter, row_starts, tile_starts,
                      [route.astype(mx.float32), backend.float_input(limit)], gate_up_reference)
    hidden = layer.fp8_input(hidden, fp8_activations)
    out = _product(DOWN, hidden, (w2,), dim, row_starts, tile_starts, [],
                   lambda: [w2(hidden[:, None], experts, sorted_indices=True).reshape(-1, dim)])
    return layer.unsorted_sum(out[:, None], order, indices.shape[1])
