"""The lightning indexer's scores for many queries (prefill) on CUDA's tensor cores.

score[b, t, w] = sum_h weight[b, t, h] * relu(q[b, t, h] . key[b, w]), with the official roundings: each
head's dot product rounded to the activation dtype, the ReLU'd product with the head weight rounded to it,
the heads summed in fp32 and the sum rounded once (`layers.indexer.reference_scores`). A thread group takes
64 queries x 64 keys: the key tile stays in shared memory, and for each head the group multiplies that
head's queries with it (nvcuda::wmma, fp32 sums over the 128 dims), then each thread rounds, ReLUs, weights
and adds its 32 scores. The reference materialises the per-head products [B, Q, H, N] in fp32 (H = 64
times the output); this reads each key row once per query tile. Keys past a query's visible count score
-inf. CUDA only (Kernel.backends); elsewhere the reference runs.
"""

from typing import Callable, List

import mlx.core as mx

from . import backend
from .prefill_matmul import ACTIVATIONS, BM, BN, LDC, STORE, THREADS, WMMA_HEADER, mma

MAX_HEAD_DIM = 128  # two 64 x (128 + 8) tiles of bf16 and the fp32 results within 48 KB of shared memory

_BODY = """
const int n_keys = info[0], n_queries = info[1];
const int n0 = int(GROUP_X) * BN, q0 = int(GROUP_Y) * BM, b = int(GROUP_Z);
constexpr int PER = BM * BN / NT;  // scores per thread
SHARED __align__(32) float smem[SMEM_FLOATS];
SHARED float head_weight[BM];
T* k_tile = reinterpret_cast<T*>(smem);  // keys x dims [BN][LDK]: wmma's column-major B
T* a_tile = k_tile + BN * LDK;  // one head's queries x dims [BM][LDK]
float* c_tile = reinterpret_cast<float*>(a_tile);  // that head's products [BM][LDC], after the products
for (int v = int(TID); v < BN * D / 8; v += NT) {
  const int n = v / (D / 8), kk = (v % (D / 8)) * 8;
  uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
  if (n0 + n < n_keys) chunk = *reinterpret_cast<const uint4*>(keys + (size_t(b) * n_keys + n0 + n) * D + kk);
  *reinterpret_cast<uint4*>(k_tile + n * LDK + kk) = chunk;
}
const int wm = int(WARP) >> 1, wn = int(WARP) & 1;  // this warp's 32 x 32 quarter
float total[PER];
for (int r = 0; r < PER; ++r) total[r] = 0.0f;
for (int h = 0; h < H; ++h) {
  BARRIER();
  for (int v = int(TID); v < BM * D / 8; v += NT) {
    const int m = v / (D / 8), kk = (v % (D / 8)) * 8;
    uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
    const size_t row = (size_t(b) * n_queries + q0 + m) * H + h;
    if (q0 + m < n_queries) chunk = *reinterpret_cast<const uint4*>(q + row * D + kk);
    *reinterpret_cast<uint4*>(a_tile + m * LDK + kk) = chunk;
  }
  for (int m = int(TID); m < BM; m += NT)
    head_weight[m] = q0 + m < n_queries ? static_cast<float>(weights[(size_t(b) * n_queries + q0 + m) * H + h]) : 0.0f;
  BARRIER();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int jj = 0; jj < 2; ++jj) wmma::fill_fragment(acc[i][jj], 0.0f);
@MMA@
@STORE@
  for (int r = 0; r < PER; ++r) {
    const int v = int(TID) + r * NT, m = v / BN, n = v % BN;
    const float dot = static_cast<float>(static_cast<T>(c_tile[m * LDC + n]));
    total[r] += static_cast<float>(static_cast<T>(FMAX(dot, 0.0f) * head_weight[m]));
  }
}
for (int r = 0; r < PER; ++r) {
  const int v = int(TID) + r * NT, m = v / BN, n = v % BN;
  if (q0 + m < n_queries && n0 + n < n_keys) {
    const bool hidden = MASK && n0 + n >= info[2 + q0 + m];
    scores[(size_t(b) * n_queries + q0 + m) * n_keys + n0 + n] = static_cast<T>(hidden ? NEG_INF : total[r]);
  }
}
"""

_PRODUCT = mma("D", "LDK", "col_major", "k_tile + (wn * 32 + jj * 16) * LDK + kk", "LDK")
KERNEL = backend.kernel("prefill_index_scores", ["q", "weights", "keys", "info"], ["scores"],
                        backend.fill(_BODY, MMA=_PRODUCT, STORE=STORE), WMMA_HEADER, backends=("cuda",))


def applies(q: mx.array, weights: mx.array, keys: mx.array) -> bool:
    """CUDA, bf16/fp16 inputs of one dtype, head dims in whole 16-wide steps up to MAX_HEAD_DIM, 32-bit indexing."""
    batch, n_queries, n_heads, head_dim = q.shape
    return (backend.backend() in KERNEL.backends and q.dtype in ACTIVATIONS and weights.dtype == q.dtype
            and keys.dtype == q.dtype and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM
            and batch * max(n_queries * n_heads, keys.shape[1]) * head_dim < 2**31
            and batch * n_queries * keys.shape[1] < 2**31)


def index_scores(q: mx.array, weights: mx.array, keys: mx.array, info: mx.array, masked: bool,
                 reference: Callable[[], List[mx.array]]) -> mx.array:
    """q [B, Q, H, Dh], weights [B, Q, H], keys [B, N, Dh] -> scores [B, Q, N] in q's dtype; info: [N, Q, then
    each query's visible count when `masked`] int32 (custom_kernels.indexer's layout)."""
    batch, n_queries, n_heads, head_dim = q.shape
    n_keys = keys.shape[1]
    ldk = head_dim + 8
    smem = (BN * ldk * 2 + max(BM * ldk * 2, BM * LDC * 4)) // 4
    template = [("T", q.dtype), ("H", n_heads), ("D", head_dim), ("MASK", masked), ("BM", BM), ("BN", BN),
                ("LDK", ldk), ("LDC", LDC), ("NT", THREADS), ("SMEM_FLOATS", smem)]
    return KERNEL.run([q, weights, keys, info], template,
                      grid=(-(-n_keys // BN) * THREADS, -(-n_queries // BM), batch), threadgroup=(THREADS, 1, 1),
                      output_shapes=[(batch, n_queries, n_keys)], output_dtypes=[q.dtype], reference=reference)[0]
