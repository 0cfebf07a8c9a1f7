"""mHC collapse and expand: three kernels, two launches per decode collapse (one in prefill), one per expand.

collapse(streams [B, L, hc, D]):
- `hc_mix_partials`, grid (S groups over the hc*D axis, N+1): group (s, n) multiplies its
  1024-column slice of fn row n (read once, coalesced) with every row's flattened streams and
  writes one partial dot product per row; the extra y = N computes the partial sum of squares.
- `hc_collapse_finish`, grid (ceil(D / 1024) groups, rows): each group adds up its row's
  partials (fixed order), one thread does the fp32 finish (rms, sigmoids, Sinkhorn on hc x hc),
  and all threads write their slice of the block input sum_i pre[i] * stream_i. Group 0 writes
  post and comb. (Each group repeats the tiny finish instead of waiting on another group.)
expand(output, streams, post, comb): `hc_expand`, one thread per (row, d) writing all hc streams
(groups of 128: 32 groups per row at D = 4096).

More than MAX_ROWS rows (prefill): MLX computes the mixes' products (one fp32 matrix product, the row's sum
of squares) as a single partial per row, and `hc_collapse_finish` does the rest in one launch (the
reference's Sinkhorn alone is ~80 small MLX ops). The pure-MLX reference (layers/hyper_connections.py) runs
where there is no GPU backend, a kernel fails to build, or the shapes are outside the kernels' range.
"""

import math

import mlx.core as mx

from . import backend
from ..layers import hyper_connections as layer

MAX_ROWS = 16  # collapse rows (batch * length) whose mixes hc_mix_partials computes; more: MLX's product
MIX_THREADS, MIX_PER_THREAD = 256, 4  # 1024 columns of fn per group: 16 x 25 = 400 groups at Flash shapes
FINISH_THREADS, FINISH_PER_THREAD = 256, 4  # 1024 block-input elements per group
FLOAT_TYPES = (mx.float32, mx.bfloat16, mx.float16)

_MIX_BODY = """
const uint s = GROUP_X;
const uint n = GROUP_Y;
const bool squares = n >= uint(N);
constexpr int NW = NT / 32;
float w[PER];
for (int j = 0; j < PER; ++j) {
  const uint c = s * uint(NT * PER) + uint(j * NT) + TID;
  w[j] = (!squares && c < uint(K)) ? static_cast<float>(fn[n * uint(K) + c]) : 0.0f;
}
SHARED float red[R * NW];
for (int r = 0; r < R; ++r) {
  float acc = 0.0f;
  for (int j = 0; j < PER; ++j) {
    const uint c = s * uint(NT * PER) + uint(j * NT) + TID;
    if (c < uint(K)) {
      const float v = static_cast<float>(x[uint(r) * uint(K) + c]);
      acc += (squares ? v : w[j]) * v;
    }
  }
  acc = WARP_SUM(acc);
  if (LANE == 0) red[r * NW + int(WARP)] = acc;
}
BARRIER();
if (TID < uint(R)) {
  float total = 0.0f;
  for (int k = 0; k < NW; ++k) total += red[TID * NW + k];
  part[(TID * uint(N + 1) + n) * uint(S) + s] = total;
}
"""

_FINISH_HEADER = """
INLINE float hc_sigmoid(float v) { return 1.0f / (1.0f + EXP(-v)); }
"""

_FINISH_BODY = """
const uint g = GROUP_X;
const uint r = GROUP_Y;
constexpr int N = (2 + HC) * HC;
SHARED float mixes[N + 1];
SHARED float pre[HC];
if (TID < uint(N + 1)) {
  float total = 0.0f;
  for (int s = 0; s < S; ++s) total += part[(r * uint(N + 1) + TID) * uint(S) + uint(s)];
  mixes[TID] = total;
}
BARRIER();
if (TID == 0) {
  const float norm_eps = eps[0];
  const float hc_eps = eps[1];
  const float inv_rms = RSQRT(mixes[N] / float(K) + norm_eps);
  const float s0 = static_cast<float>(scale[0]);
  for (int i = 0; i < HC; ++i)
    pre[i] = hc_sigmoid(mixes[i] * inv_rms * s0 + static_cast<float>(base[i])) + hc_eps;
  if (g == 0) {
    const float s1 = static_cast<float>(scale[1]);
    const float s2 = static_cast<float>(scale[2]);
    for (int i = 0; i < HC; ++i)
      post[r * uint(HC) + uint(i)] = 2.0f * hc_sigmoid(mixes[HC + i] * inv_rms * s1 + static_cast<float>(base[HC + i]));
    float c[HC * HC];
    for (int k = 0; k < HC * HC; ++k) c[k] = mixes[2 * HC + k] * inv_rms * s2 + static_cast<float>(base[2 * HC + k]);
    // softmax over each row (j), + eps
    for (int i = 0; i < HC; ++i) {
      float m = c[i * HC];
      for (int j = 1; j < HC; ++j) m = FMAX(m, c[i * HC + j]);
      float sum = 0.0f;
      for (int j = 0; j < HC; ++j) {
        c[i * HC + j] = EXP(c[i * HC + j] - m);
        sum += c[i * HC + j];
      }
      for (int j = 0; j < HC; ++j) c[i * HC + j] = c[i * HC + j] / sum + hc_eps;
    }
    for (int it = 0; it < ITERS; ++it) {
      if (it > 0) {  // rows
        for (int i = 0; i < HC; ++i) {
          float sum = 0.0f;
          for (int j = 0; j < HC; ++j) sum += c[i * HC + j];
          for (int j = 0; j < HC; ++j) c[i * HC + j] = c[i * HC + j] / (sum + hc_eps);
        }
      }
      for (int j = 0; j < HC; ++j) {  // columns
        float sum = 0.0f;
        for (int i = 0; i < HC; ++i) sum += c[i * HC + j];
        for (int i = 0; i < HC; ++i) c[i * HC + j] = c[i * HC + j] / (sum + hc_eps);
      }
    }
    for (int k = 0; k < HC * HC; ++k) comb[r * uint(HC * HC) + uint(k)] = c[k];
  }
}
BARRIER();
for (int j = 0; j < PER; ++j) {
  const uint d = g * uint(NT * PER) + uint(j * NT) + TID;
  if (d < uint(D)) {
    float acc = 0.0f;
    for (int i = 0; i < HC; ++i) acc += pre[i] * static_cast<float>(x[(r * uint(HC) + uint(i)) * uint(D) + d]);
    y[r * uint(D) + d] = static_cast<T>(acc);
  }
}
"""

_EXPAND_BODY = """
const uint e = GROUP_X * uint(NT) + TID;  // the grid is exactly rows * D threads
const uint r = e / uint(D);
const uint d = e - r * uint(D);
const float o = static_cast<float>(block_out[e]);
float xs[HC];
for (int i = 0; i < HC; ++i) xs[i] = static_cast<float>(x[(r * uint(HC) + uint(i)) * uint(D) + d]);
for (int j = 0; j < HC; ++j) {
  float mixed = 0.0f;
  for (int i = 0; i < HC; ++i) mixed += static_cast<float>(comb[(r * uint(HC) + uint(i)) * uint(HC) + uint(j)]) * xs[i];
  y[(r * uint(HC) + uint(j)) * uint(D) + d] = static_cast<O>(static_cast<float>(post[r * uint(HC) + uint(j)]) * o + mixed);
}
"""

MIX = backend.kernel("hc_mix_partials", ["x", "fn"], ["part"], _MIX_BODY)
FINISH = backend.kernel("hc_collapse_finish", ["part", "x", "base", "scale", "eps"], ["y", "post", "comb"],
                        _FINISH_BODY, _FINISH_HEADER)
EXPAND = backend.kernel("hc_expand", ["block_out", "x", "post", "comb"], ["y"], _EXPAND_BODY)


def collapse(streams: mx.array, fn: mx.array, base: mx.array, scale: mx.array, iters: int, eps: float,
             norm_eps: float):
    """streams [B, L, hc, D] -> (block input [B, L, D] in the streams' dtype, post [B, L, hc] fp32,
    comb [B, L, hc, hc] fp32), as `layer.collapse_reference`."""
    *lead, hc, dim = streams.shape
    rows, n, k = math.prod(lead), (2 + hc) * hc, hc * dim

    def reference():
        return layer.collapse_reference(streams, fn, base, scale, iters, eps, norm_eps)

    if (backend.backend() is None or rows == 0 or tuple(fn.shape) != (n, k)
            or base.size != n or scale.size != 3 or n + 1 > FINISH_THREADS
            or any(a.dtype not in FLOAT_TYPES for a in (streams, fn, base, scale))):
        return reference()
    if rows > MAX_ROWS:  # prefill: the products in MLX (one matrix product), as one partial per row
        flat = streams.astype(mx.float32).reshape(rows, k)
        part, splits = [mx.concatenate([flat @ fn.T, mx.sum(flat * flat, axis=-1, keepdims=True)], axis=-1)], 1
    else:
        splits = -(-k // (MIX_THREADS * MIX_PER_THREAD))
        part = MIX.run([streams, fn], [("T", streams.dtype), ("W", fn.dtype), ("K", k), ("N", n), ("R", rows),
                                       ("S", splits), ("NT", MIX_THREADS), ("PER", MIX_PER_THREAD)],
                       grid=(splits * MIX_THREADS, n + 1, 1), threadgroup=(MIX_THREADS, 1, 1),
                       output_shapes=[(rows, n + 1, splits)], output_dtypes=[mx.float32], reference=lambda: None)
    if part is None:
        return reference()
    groups = -(-dim // (FINISH_THREADS * FINISH_PER_THREAD))
    out = FINISH.run([part[0], streams, base, scale, backend.float_input(norm_eps, eps)],
                     [("T", streams.dtype), ("HC", hc), ("D", dim), ("K", k), ("S", splits), ("ITERS", iters),
                      ("NT", FINISH_THREADS), ("PER", FINISH_PER_THREAD)],
                     grid=(groups * FINISH_THREADS, rows, 1), threadgroup=(FINISH_THREADS, 1, 1),
                     output_shapes=[(*lead, dim), (*lead, hc), (*lead, hc, hc)],
                     output_dtypes=[streams.dtype, mx.float32, mx.float32], reference=lambda: None)
    if out is None:
        return reference()
    return tuple(out)


def expand(output: mx.array, streams: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """new stream j = post[j] * output + sum_i comb[i, j] * streams[i] -> [B, L, hc, D] in the
    output's dtype, as `layer.expand_reference`."""
    *lead, hc, dim = streams.shape
    rows = math.prod(lead)

    def reference():
        return layer.expand_reference(output, streams, post, comb)

    threads = next((t for t in (128, 64, 32) if dim % t == 0), None)  # D = 4096: 32 groups per row
    if (backend.backend() is None or rows == 0 or threads is None or rows * hc * dim >= 2**31
            or tuple(output.shape) != (*lead, dim) or tuple(post.shape) != (*lead, hc)
            or tuple(comb.shape) != (*lead, hc, hc)
            or any(a.dtype not in FLOAT_TYPES for a in (output, streams, post, comb))):
        return reference()
    new = EXPAND.run([output, streams, post, comb],
                     [("O", output.dtype), ("T", streams.dtype), ("HC", hc), ("D", dim), ("NT", threads)],
                     grid=(rows * dim, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[streams.shape],
                     output_dtypes=[output.dtype], reference=lambda: [reference()])
    return new[0]
