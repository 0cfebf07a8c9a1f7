"""Prefill attention (many queries, each its own keys) on CUDA's tensor cores.

Each query attends to its W window keys and to compressed candidates (the indexer's picks on sparse CSA
layers, else all compressed rows, those not yet visible masked), one 512-wide KV head for all query heads.
Per query that is a product of its heads [H, D] with its key rows: two kernels, each a 64 x 64 tile of one
query's heads against 64 of its keys (or value dims), the rows read where they lie (no gathered copy):
- `prefill_scores`: scores [B, Q, H, NK] = scale * q . k in fp32 (the key columns: the W window keys,
  then the candidates; -inf where a column has no key, and in the padding to whole tiles of 64);
- MLX: peak over the columns, P = exp(scores - peak) in fp32, the denominator sum(P) + exp(sink - peak),
  P rounded to the activation dtype (as the reference and the official kernel do);
- `prefill_values`: out [B, Q, H, D] = (P @ V) / denominator, V rows = the same key rows (K == V).
Products use nvcuda::wmma fragments (bf16/fp16 in, fp32 sums) in prefill_matmul's tiling: the numbers
are the pure-MLX reference's (`Attention._attend_block`, which multiplies the same values in fp32) up to
the order of fp32 additions. Scores of one launch stay under SCORE_BUDGET elements; the caller cuts longer
chunks into query blocks. CUDA only (Kernel.backends); elsewhere the reference runs.
"""

from typing import Callable, Optional

import mlx.core as mx

from . import backend
from .prefill_matmul import ACTIVATIONS, BK, BM, BN, LDA, LDC, STORE, THREADS, WMMA_HEADER, mma

LDB = BN + 8  # the value tile's row stride (row-major B)
SCORE_BUDGET = 1 << 27  # fp32 score elements of one launch (512 MB)
SMEM_FLOATS = max(BM * LDA + BN * LDA, BM * LDA + BK * LDB, 2 * BM * LDC) // 2

# meta: start (position of the chunk's first query), first (this launch's first query in the chunk),
# n_all (the chunk's queries: window_keys has W + n_all rows), n_rows, n_cand (candidate columns), nk (all
# columns, whole tiles), nq (this launch's queries)
_PREAMBLE = """
const int start = meta[0], first = meta[1], n_all = meta[2], n_rows = meta[3], n_cand = meta[4];
const int nk = meta[5], nq = meta[6];
const int j = int(GROUP_Y), b = int(GROUP_Z);
const int qi = first + j;  // the query's index in the chunk
const int t = start + qi;  // its position
const int n_visible = RATIO > 0 ? min((t + 1) / (RATIO > 0 ? RATIO : 1), n_rows) : 0;
SHARED __align__(32) float smem[SMEM_FLOATS];
SHARED const T* key_rows[@KT@];
float* c_tile = smem;  // the results [BM][LDC], after the products
const int wm = int(WARP) >> 1, wn = int(WARP) & 1;  // this warp's 32 x 32 quarter of the tile
wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
for (int i = 0; i < 2; ++i)
  for (int jj = 0; jj < 2; ++jj) wmma::fill_fragment(acc[i][jj], 0.0f);
"""

# the rows of key columns u0 .. u0 + KT - 1 of this query: window row qi + 1 + u (empty before position 0),
# else candidate c = u - W: the pick picks[b, j, c] (-1: none) or compressed row c while visible
_KEY_ROWS = """
for (int n = int(TID); n < @KT@; n += NT) {
  const int u = u0 + n;
  const T* row = nullptr;
  if (u < W) {
    if (u >= W - 1 - t) row = wkeys + (size_t(b) * (W + n_all) + qi + 1 + u) * D;
  } else if (u - W < n_cand) {
    const int c = u - W;
    const int r = PICKS ? picks[(size_t(b) * nq + j) * n_cand + c] : (c < n_visible ? c : -1);
    if (r >= 0) row = comp + (size_t(b) * n_rows + r) * D;
  }
  key_rows[n] = row;
}
"""

# 16-byte copies of 8 elements: rows [ROWS] of BK (scores: the query's heads) into a_tile [BM][LDA]
_COPY_A = """
for (int v = int(TID); v < BM * BK / 8; v += NT) {
  const int m = v / (BK / 8), kk = (v % (BK / 8)) * 8;
  uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
  if (h0 + m < H) chunk = *reinterpret_cast<const uint4*>(@ROW@ + kk);
  *reinterpret_cast<uint4*>(a_tile + m * LDA + kk) = chunk;
}
"""

# 16-byte copies of 8 elements: @COLS@ elements from @FROM@ of each key row (zeros where there is none) into
# b_tile [@KEYS@][@LD@]
_COPY_KEYS = """
  for (int v = int(TID); v < @KEYS@ * @COLS@ / 8; v += NT) {
    const int r = v / (@COLS@ / 8), c = (v % (@COLS@ / 8)) * 8;
    uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
    if (key_rows[r] != nullptr) chunk = *reinterpret_cast<const uint4*>(key_rows[r] + @FROM@ + c);
    *reinterpret_cast<uint4*>(b_tile + r * @LD@ + c) = chunk;
  }
"""

_SCORES = """
const int col_tiles = nk / BN;
const int h0 = int(GROUP_X) / col_tiles * BM;
const int u0 = int(GROUP_X) % col_tiles * BN;
@KEY_ROWS@
T* a_tile = reinterpret_cast<T*>(smem);  // heads x dims [BM][LDA]
T* b_tile = a_tile + BM * LDA;  // keys x dims [BN][LDA]: wmma's column-major B
const T* q_heads = q + (size_t(b) * n_all + qi) * H * D;
for (int k0 = 0; k0 < D; k0 += BK) {
  BARRIER();
@COPY_A@
@COPY_KEYS@
  BARRIER();
@MMA@
}
@STORE@
const float scale = scale_in[0];
for (int v = int(TID); v < BM * BN; v += NT) {
  const int m = v / BN, n = v % BN;
  if (h0 + m < H)
    scores[((size_t(b) * nq + j) * H + h0 + m) * nk + u0 + n] = key_rows[n] != nullptr ? c_tile[m * LDC + n] * scale
                                                                                      : NEG_INF;
}
"""

_VALUES = """
const int dim_tiles = D / BN;
const int h0 = int(GROUP_X) / dim_tiles * BM;
const int d0 = int(GROUP_X) % dim_tiles * BN;
T* a_tile = reinterpret_cast<T*>(smem);  // heads x keys [BM][LDA]: the probabilities
T* b_tile = a_tile + BM * LDA;  // keys x dims [BK][LDB]: the value rows (row-major B)
const T* p_heads = probs + (size_t(b) * nq + j) * H * nk;
for (int u0 = 0; u0 < nk; u0 += BK) {
  BARRIER();
@KEY_ROWS@
  BARRIER();
@COPY_A@
@COPY_KEYS@
  BARRIER();
@MMA@
}
@STORE@
for (int v = int(TID); v < BM * BN; v += NT) {
  const int m = v / BN, n = v % BN;
  if (h0 + m < H) {
    const size_t row = (size_t(b) * nq + j) * H + h0 + m;
    out[row * D + d0 + n] = static_cast<T>(c_tile[m * LDC + n] / den[row]);
  }
}
"""


def _kernel(name, inputs, outputs, body, keys, a_row, key_cols, product):
    """key_cols: (COLS, FROM, LD) of _COPY_KEYS."""
    cols, start, ld = key_cols
    source = backend.fill(_PREAMBLE, KT=keys) + backend.fill(
        body, KEY_ROWS=backend.fill(_KEY_ROWS, KT=keys), COPY_A=backend.fill(_COPY_A, ROW=a_row),
        COPY_KEYS=backend.fill(_COPY_KEYS, KEYS=keys, COLS=cols, FROM=start, LD=ld), MMA=product, STORE=STORE)
    return backend.kernel(name, inputs, outputs, source, WMMA_HEADER, backends=("cuda",))


SCORES = _kernel("prefill_scores", ["q", "wkeys", "comp", "picks", "scale_in", "meta"], ["scores"], _SCORES,
                 "BN", "q_heads + (h0 + m) * D + k0", ("BK", "k0", "LDA"),
                 mma("BK", "LDA", "col_major", "b_tile + (wn * 32 + jj * 16) * LDA + kk", "LDA"))
VALUES = _kernel("prefill_values", ["probs", "wkeys", "comp", "picks", "den", "meta"], ["out"], _VALUES,
                 "BK", "p_heads + (h0 + m) * nk + u0", ("BN", "d0", "LDB"),
                 mma("BK", "LDA", "row_major", "b_tile + kk * LDB + wn * 32 + jj * 16", "LDB"))


def applies(q: mx.array, window_keys: mx.array, compressed: Optional[mx.array]) -> bool:
    """Whether the kernels take this chunk: CUDA, bf16/fp16 queries and keys of one dtype, whole tiles of head
    dims, 32-bit indexing."""
    batch, length, heads, dims = q.shape
    rows = max(window_keys.shape[1], 0 if compressed is None else compressed.shape[1])
    return (backend.backend() in SCORES.backends and q.dtype in ACTIVATIONS and window_keys.dtype == q.dtype
            and (compressed is None or compressed.dtype == q.dtype) and dims % BN == 0
            and batch * max(length * heads, rows) * dims < 2**31)


def columns(window: int, candidates: int) -> int:
    """Key columns per query, in whole tiles."""
    return -(-(window + candidates) // BN) * BN


def block_queries(batch: int, heads: int, n_columns: int) -> int:
    """Queries per launch: their fp32 scores [B, Q, H, NK] within SCORE_BUDGET."""
    return max(1, SCORE_BUDGET // (batch * heads * n_columns))


@mx.compile
def _softmax_parts(scores: mx.array, sink: mx.array):
    """scores [B, Q, H, NK] fp32, sink [H] -> (P = exp(scores - peak), denominator [B, Q, H] with the sink)."""
    peak = mx.max(scores, axis=-1, keepdims=True)
    probs = mx.exp(scores - peak)
    return probs, mx.sum(probs, axis=-1) + mx.exp(sink - peak[..., 0])


def attend(q: mx.array, window_keys: mx.array, compressed: Optional[mx.array], picks: Optional[mx.array],
           sink: mx.array, *, start: int, first: int, count: int, ratio: int, scale: float,
           reference: Callable[[], mx.array]) -> mx.array:
    """Queries first .. first + count - 1 of a chunk q [B, L, H, D] at positions start.. -> [B, count, H, D].

    window_keys [B, W + L, D]: `WindowCache.window_keys` of the chunk (query i sees rows i + 1 .. i + W, those
    at negative positions empty). compressed [B, N, D] or None; picks [B, count, k] int32 (-1: none) gives
    each query its compressed rows, else row w is visible to position t when w < (t + 1) // ratio. sink [H]
    fp32. `reference()` computes the same [B, count, H, D] with pure-MLX ops."""
    batch, length, heads, dims = q.shape
    window = window_keys.shape[1] - length
    n_rows = 0 if compressed is None else compressed.shape[1]
    n_cand = 0 if not n_rows else (picks.shape[-1] if picks is not None else n_rows)
    nk = columns(window, n_cand)
    meta = mx.array([start, first, length, n_rows, n_cand, nk, count], dtype=mx.int32)
    comp = compressed if n_rows else window_keys  # not read without rows
    has_picks = picks is not None and n_rows > 0
    template = [("T", q.dtype), ("H", heads), ("D", dims), ("W", window), ("RATIO", ratio), ("PICKS", has_picks),
                ("BM", BM), ("BN", BN), ("BK", BK), ("LDA", LDA), ("LDB", LDB), ("LDC", LDC), ("NT", THREADS),
                ("SMEM_FLOATS", SMEM_FLOATS)]
    head_tiles = -(-heads // BM)
    key_inputs = [window_keys, comp, picks if has_picks else meta]
    fell_back = []

    def fallback():
        fell_back.append(True)
        return [reference()]

    scores = SCORES.run([q, *key_inputs, backend.float_input(scale), meta], template,
                        grid=(head_tiles * nk // BN * THREADS, count, batch), threadgroup=(THREADS, 1, 1),
                        output_shapes=[(batch, count, heads, nk)], output_dtypes=[mx.float32],
                        reference=fallback)[0]
    if fell_back:
        return scores
    probs, denominator = _softmax_parts(scores, sink)
    return VALUES.run([probs.astype(q.dtype), *key_inputs, denominator, meta], template,
                      grid=(head_tiles * dims // BN * THREADS, count, batch), threadgroup=(THREADS, 1, 1),
                      output_shapes=[(batch, count, heads, dims)], output_dtypes=[q.dtype],
                      reference=fallback)[0]
