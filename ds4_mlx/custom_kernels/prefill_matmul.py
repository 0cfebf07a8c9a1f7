"""Quantized products over many rows (prefill) on CUDA's tensor cores, reading the packed weights directly.

MLX 0.32.4's CUDA quantized products run at a few TFLOP/s (affine gather_qmm) to ~20 TFLOP/s (mxfp4/mxfp8)
on many rows; an H100 does ~790 TFLOP/s of bf16 products. One kernel body serves every prefill product:
rows [R, K] that come in groups (routed experts: the token-expert rows sorted by expert; wo_a: the rows
of each output group; a plain linear: one group), each group multiplied by its own matrix [N, K] of a
stack of E. The rows of a group are cut into tiles of BM; a thread group computes a BM x BN tile:
- each K step (BK = 64 columns) it copies its rows' activations into shared memory and decodes the BN x BK
  weight slice into shared memory in the activation dtype (affine 2/4/8-bit: s * q + b in fp32, rounded
  once; mxfp8: e4m3 code times 2^(e - 127), exact in bf16), two values per conversion instruction and codes
  turned into floats by their bits (no integer conversion instructions); the next step's activations and
  packed weights are loaded into registers while the tensor cores multiply the current step;
- four warps multiply 16 x 16 x 16 fragments (nvcuda::wmma, fp32 accumulators), each a 32 x 32 quarter;
- the epilogue rounds to the activation dtype (`matmul`), or, for the routed experts' gate and up
  products computed together (`gate_up`), rounds both and writes the route-weighted clamped SwiGLU.
A thread group finds its group of rows by binary search over the groups' first tiles (`tile_starts`),
so the grid is sized without reading the grouping on the host: (N / BN, ceil(R / BM) + E) groups.

Numerics, against MLX's quantized products: the same weights, except that affine ones are rounded to the
activation dtype (relative 2^-9 in bf16; MLX's CPU products use them unrounded, while its CUDA gather_qmm
agreed with these kernels to 4e-5 relative L2 on 2048 tokens of q2 experts on an H200), fp32 sums in another
order, products rounded to the activation dtype. Measured speed: README (`benchmarks/moe_prefill.py`,
`benchmarks/prefill.py`). CUDA only (Kernel.backends): Metal and the CPU keep MLX's products, as do fp32
activations and shapes that are not whole 64-wide tiles.
"""

from typing import Optional

import mlx.core as mx

from . import backend

BM, BN, BK, THREADS = 64, 64, 64, 128  # tile rows, tile columns, K step, threads (4 warps of 32 x 32)
LDA = BK + 8  # shared row strides in elements (padded: fewer bank conflicts; wmma needs multiples of 8)
LDC = BN + 4
ACTIVATIONS = (mx.bfloat16, mx.float16)
MIN_ROWS = 128  # a plain linear takes this path from this many rows (fewer: MLX's matrix-vector kernels)

WMMA_HEADER = """
#ifndef K_HOST_STUB
#include <mma.h>
#endif
namespace wmma = nvcuda::wmma;
"""
# the warp's accumulators into c_tile [BM][LDC] fp32 (after every warp's last product)
STORE = """
BARRIER();
for (int i = 0; i < 2; ++i)
  for (int jj = 0; jj < 2; ++jj)
    wmma::store_matrix_sync(c_tile + (wm * 32 + i * 16) * LDC + wn * 32 + jj * 16, acc[i][jj], LDC,
                            wmma::mem_row_major);
BARRIER();
"""

# one warp's 32 x 32 quarter of the tile over @STEPS@ columns of a_tile (row-major, stride @LDA@) and B
# fragments (@LAYOUT@, stride @LDB@) at @B_AT@ (for the warp's 16-column part jj and step kk)
_MMA = """
#pragma unroll
for (int kk = 0; kk < @STEPS@; kk += 16) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
  #pragma unroll
  for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_tile + (wm * 32 + i * 16) * @LDA@ + kk, @LDA@);
  #pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::@LAYOUT@> bf;
    wmma::load_matrix_sync(bf, @B_AT@, @LDB@);
    #pragma unroll
    for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][jj], a[i], bf, acc[i][jj]);
  }
}
"""


def mma(steps: str, lda: str, layout: str, b_at: str, ldb: str) -> str:
    """The product step of a 64 x 64 tile (four warps) for the kernels that tile one matrix this way
    (prefill_attention, prefill_index), as source: see _MMA."""
    return backend.fill(_MMA, STEPS=steps, LDA=lda, LAYOUT=layout, B_AT=b_at, LDB=ldb)


_HEADER = WMMA_HEADER + """
INLINE float k_small(uint q) { return __uint_as_float(0x4B000000u | q) - 8388608.0f; }  // float(q), q < 2^23, no I2F
INLINE float k_e8m0(uint e) { return __uint_as_float(e ? e << 23 : 0x00400000u); }  // 2^(e - 127)
INLINE float k_e4m3(uint c) {
  const uint e = (c >> 3) & 15u, m = c & 7u;
  const float v = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : k_small(m) * 0.001953125f;
  return (c & 128u) ? -v : v;
}
// two floats rounded to the activation dtype, packed (a in the low half): one conversion instruction for both
#ifndef K_HOST_STUB
INLINE uint k_pack2(float a, float b, __nv_bfloat16) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint*>(&v);
}
INLINE uint k_pack2(float a, float b, __half) {
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint*>(&v);
}
#else
template <typename U> INLINE uint k_pack2(float a, float b, U) {
  const U lo = static_cast<U>(a), hi = static_cast<U>(b);
  uint16_t l, h;
  std::memcpy(&l, &lo, 2);
  std::memcpy(&h, &hi, 2);
  return uint(l) | (uint(h) << 16);
}
#endif
"""

_BODY = """
constexpr int PER_WORD = 32 / BITS;
constexpr uint MASK = (1u << BITS) - 1u;
constexpr int WORDS = K / PER_WORD;  // packed words per weight row
constexpr int GROUPS = K / GS;  // scales per weight row
constexpr int KW = BK / PER_WORD;  // words per weight row in one K step
constexpr int A_COPIES = BM * BK / 8 / NT;  // 16-byte copies of activations per thread and K step
constexpr int B_WORDS = BN * KW / NT;  // packed words per thread, matrix and K step
const int tile = int(GROUP_Y);
if (tile >= tile_starts[E]) return;
int lo = 0, hi = E;  // the group e with tile_starts[e] <= tile < tile_starts[e + 1]
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
#pragma unroll
for (int m = 0; m < MATS; ++m)
  #pragma unroll
  for (int i = 0; i < 2; ++i)
    #pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[m][i][j], 0.0f);
// the next K step's activations and packed weights (with their scales), loaded into registers while the
// tensor cores multiply the current step
uint4 a_next[A_COPIES];
uint w_next[MATS][B_WORDS];
float s_next[MATS][B_WORDS], b_next[MATS][B_WORDS];
int k_load = 0;  // the K step the loads read
@LOAD@
for (int k0 = 0; k0 < K; k0 += BK) {
  BARRIER();  // every warp is done with the previous step's slices
  #pragma unroll
  for (int i = 0; i < A_COPIES; ++i) {
    const int v = int(TID) + i * NT;
    *reinterpret_cast<uint4*>(a_tile + (v / (BK / 8)) * LDA + (v % (BK / 8)) * 8) = a_next[i];
  }
  #pragma unroll
  for (int m = 0; m < MATS; ++m)
    #pragma unroll
    for (int i = 0; i < B_WORDS; ++i) {
      const int v = int(TID) + i * NT;
      const uint word = w_next[m][i];
      const float s = s_next[m][i], b = b_next[m][i];
      uint packed[PER_WORD / 2];
      #pragma unroll
      for (int j = 0; j < PER_WORD; j += 2) packed[j / 2] = k_pack2(@VALUE@(j), @VALUE@(j + 1), T());
      uint* dst = reinterpret_cast<uint*>(b_tile + (m * BN + v / KW) * LDA + (v % KW) * PER_WORD);
      if (PER_WORD >= 8) {
        #pragma unroll
        for (int q = 0; q < PER_WORD / 8; ++q)
          reinterpret_cast<uint4*>(dst)[q] = make_uint4(packed[4 * q], packed[4 * q + 1], packed[4 * q + 2],
                                                        packed[4 * q + 3]);
      } else {
        *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
      }
    }
  BARRIER();
  k_load = k0 + BK;
  if (k_load < K) {
@LOAD@
  }
  #pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
    #pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_tile + (wm * 32 + i * 16) * LDA + kk, LDA);
    #pragma unroll
    for (int m = 0; m < MATS; ++m)
      #pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, b_tile + (m * BN + wn * 32 + j * 16) * LDA + kk, LDA);
        #pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[m][i][j], a[i], b, acc[m][i][j]);
      }
  }
}
BARRIER();
float* c_tile = smem;
#pragma unroll
for (int m = 0; m < MATS; ++m)
  #pragma unroll
  for (int i = 0; i < 2; ++i)
    #pragma unroll
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

# the loads of K step k_load into the registers: the activations, then per matrix @M@ (w@W@: codes, s@W@: scales,
# b@W@: biases) its packed words and their group's scale (and bias)
_LOAD_ACTIVATIONS = """  for (int i = 0; i < A_COPIES; ++i) {
    const int v = int(TID) + i * NT, m = v / (BK / 8);
    a_next[i] = m < rows ? *reinterpret_cast<const uint4*>(x + size_t(r0 + m) * K + k_load + (v % (BK / 8)) * 8)
                         : make_uint4(0u, 0u, 0u, 0u);
  }"""
_LOAD = {
    "affine": """  for (int i = 0; i < B_WORDS; ++i) {
    const int v = int(TID) + i * NT, wd = v % KW;
    const size_t row = size_t(e) * N + n0 + v / KW;
    const int g = (k_load + wd * PER_WORD) / GS;
    w_next[@M@][i] = w@W@[row * WORDS + k_load / PER_WORD + wd];
    s_next[@M@][i] = static_cast<float>(s@W@[row * GROUPS + g]);
    b_next[@M@][i] = static_cast<float>(b@W@[row * GROUPS + g]);
  }""",
    "mxfp8": """  for (int i = 0; i < B_WORDS; ++i) {
    const int v = int(TID) + i * NT, wd = v % KW;
    const size_t row = size_t(e) * N + n0 + v / KW;
    w_next[@M@][i] = w@W@[row * WORDS + k_load / PER_WORD + wd];
    s_next[@M@][i] = k_e8m0(uint(s@W@[row * GROUPS + (k_load + wd * PER_WORD) / GS]));
    b_next[@M@][i] = 0.0f;
  }""",
}
# the decoded weight j of a packed word (affine: s * q + b in fp32, rounded once to T by k_pack2; mxfp8: the
# e4m3 code times the block's power of two, exact in T)
_VALUE = {"affine": "K_AFFINE", "mxfp8": "K_MXFP8"}
_VALUE_MACROS = """
#define K_AFFINE(j) (s * k_small((word >> ((j) * BITS)) & MASK) + b)
#define K_MXFP8(j) (k_e4m3((word >> (8 * (j))) & 255u) * s)
"""

_EPILOGUE = {
    "gate_up": """    // as the reference: the gate and up products rounded to the activation dtype, the SwiGLU in fp32
    float gv = static_cast<float>(static_cast<T>(c_tile[m * LDC + n]));
    float uv = static_cast<float>(static_cast<T>(c_tile[(BM + m) * LDC + n]));
    const float limit = params[0];
    if (limit > 0.0f) {
      gv = FMIN(gv, limit);
      uv = FMAX(FMIN(uv, limit), -limit);
    }
    const float h = ((gv * (1.0f / (1.0f + EXP(-gv)))) * uv) * route[r0 + m];
    y[size_t(r0 + m) * N + n0 + n] = static_cast<T>(h);""",
    "matmul": """    y[size_t(r0 + m) * N + n0 + n] = static_cast<T>(c_tile[m * LDC + n]);""",
}

FORMATS = {"affine": ("w", "s", "b"), "mxfp8": ("w", "s")}  # the arrays of a quantized matrix, by mode


def _kernel(epilogue: str, mode: str) -> backend.Kernel:
    matrices = (1, 3) if epilogue == "gate_up" else (1,)
    load = "\n".join([_LOAD_ACTIVATIONS] + [backend.fill(_LOAD[mode], W=str(w), M=str(i))
                                            for i, w in enumerate(matrices)])
    weights = [f"{a}{w}" for w in matrices for a in FORMATS[mode]]
    extra = ["route", "params"] if epilogue == "gate_up" else []
    return backend.kernel(f"prefill_{epilogue}_{mode}", ["x", *weights, "row_starts", "tile_starts", *extra], ["y"],
                          backend.fill(_BODY, LOAD=load, VALUE=_VALUE[mode], EPILOGUE=_EPILOGUE[epilogue]),
                          _HEADER + _VALUE_MACROS,
                          backends=("cuda",))


KERNELS = {("gate_up", "affine"): _kernel("gate_up", "affine"), ("matmul", "affine"): _kernel("matmul", "affine"),
           ("matmul", "mxfp8"): _kernel("matmul", "mxfp8")}


def mode(linear) -> Optional[str]:
    """The weight format of a quantized (stacked) linear these kernels decode, else None."""
    kind = getattr(linear, "mode", None)
    if "bias" in linear or getattr(linear, "global_scale", None) is not None:
        return None
    if kind == "affine" and getattr(linear, "biases", None) is not None and linear.bits in (2, 4, 8):
        return "affine" if linear.group_size >= 32 // linear.bits else None
    if kind == "mxfp8" and getattr(linear, "biases", None) is None:
        return "mxfp8"
    return None


def tiles_fit(dtype, in_dims: int, linear) -> bool:
    """Inputs of `dtype` and width `in_dims` fit the quantized linear, the dtype has a tensor-core path and
    the product's sizes are whole tiles."""
    weight_in, out_dims = linear.weight.shape[-1] * 32 // linear.bits, linear.weight.shape[-2]
    return dtype in ACTIVATIONS and in_dims == weight_in and in_dims % BK == 0 and out_dims % BN == 0


def row_tiles(row_starts: mx.array) -> mx.array:
    """tile_starts [E + 1] int32 (each group's first tile) from row_starts [E + 1] (its first row)."""
    tiles = (row_starts[1:] - row_starts[:-1] + BM - 1) // BM
    return mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(tiles).astype(mx.int32)])


def grouped_product(x: mx.array, linears, row_starts: mx.array, tile_starts: mx.array, reference,
                    route: Optional[mx.array] = None, limit: float = 0.0) -> mx.array:
    """x [R, K] in groups (rows row_starts[e]..row_starts[e+1]-1 use matrix e of each stacked linear) ->
    [R, N] in x's dtype: one linear (`matmul`), or w1 and w3 with `route` [R] fp32 (`gate_up`: the
    route-weighted clamped SwiGLU). `reference()` returns the same as a list of one array."""
    (rows, k), first = x.shape, linears[0]
    fmt = mode(first)
    epilogue = "gate_up" if len(linears) == 2 else "matmul"
    experts = 1 if first.weight.ndim == 2 else first.weight.shape[0]
    out_dims = first.weight.shape[-2]
    smem = max(BM * LDA + len(linears) * BN * LDA, 2 * len(linears) * BM * LDC) // 2  # floats
    arrays = ("weight", "scales", "biases")[:len(FORMATS[fmt])]
    inputs = [x] + [getattr(w, name) for w in linears for name in arrays]
    inputs += [row_starts, tile_starts] + ([route, backend.float_input(limit)] if epilogue == "gate_up" else [])
    return KERNELS[epilogue, fmt].run(
        inputs, [("T", x.dtype), ("BITS", first.bits), ("GS", first.group_size), ("K", k), ("N", out_dims),
                 ("E", experts), ("MATS", len(linears)), ("BM", BM), ("BN", BN), ("BK", BK), ("LDA", LDA),
                 ("LDC", LDC), ("NT", THREADS), ("SMEM_FLOATS", smem)],
        grid=(out_dims // BN * THREADS, -(-rows // BM) + experts, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, out_dims)], output_dtypes=[x.dtype], reference=reference)[0]


def _applies(x: mx.array, linear, rows: int) -> bool:
    return (rows >= MIN_ROWS and backend.backend() == "cuda" and mode(linear) is not None
            and tiles_fit(x.dtype, x.shape[-1], linear))


def linear(x: mx.array, layer, reference) -> mx.array:
    """A quantized linear `layer` on x [..., K] -> [..., N]: the kernel for prefill-sized inputs on CUDA,
    else `reference()` (MLX's quantized product)."""
    rows = x.size // max(x.shape[-1], 1)
    if not _applies(x, layer, rows):
        return reference()
    starts = mx.array([0, rows], dtype=mx.int32)
    out = grouped_product(x.reshape(rows, -1), (layer,), starts, row_tiles(starts),
                          lambda: [reference().reshape(rows, -1)])
    return out.reshape(*x.shape[:-1], -1)


def per_group(x: mx.array, layer, reference) -> mx.array:
    """A stack of G quantized linears `layer` applied group-wise: x [..., G, 1, K] -> [..., G, 1, N] (the
    layout of MLX's gathered product), group g through matrix g (wo_a), as `reference()`."""
    *lead, groups, _, k = x.shape
    rows = x.size // max(groups * k, 1)
    if not _applies(x, layer, rows) or layer.weight.shape[0] != groups:
        return reference()
    group_major = mx.swapaxes(x.reshape(rows, groups, k), 0, 1).reshape(groups * rows, k)
    starts = mx.arange(groups + 1, dtype=mx.int32) * rows

    def group_major_reference():
        return [mx.swapaxes(reference().reshape(rows, groups, -1), 0, 1).reshape(groups * rows, -1)]

    out = grouped_product(group_major, (layer,), starts, row_tiles(starts), group_major_reference)
    return mx.swapaxes(out.reshape(groups, rows, -1), 0, 1).reshape(*lead, groups, 1, -1)
