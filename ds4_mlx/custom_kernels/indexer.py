"""Lightning-indexer scores for decode: score[b, t, w] = sum_h weight[b, t, h] * relu(q[b, t, h] . k[b, w])
for a few queries t over all N index keys, with the reference's roundings (`layers.indexer.reference_scores`).

One thread group takes TK = SLOTS * KW consecutive keys of one (batch, query) and all H heads. Its
HG * SLOTS threads each own HT heads x KW keys (a register tile of HT * KW fp32 accumulators); the
queries and keys are staged in shared memory as float, BK dimensions at a time (the next chunk is
loaded into registers while the current one is used), so each key row is read from memory once and
reused for every head. Then each (head, key) dot product is rounded to the activation dtype, ReLU'd,
multiplied by the head's weight (rounded again), the terms go to shared memory, and one thread per
key sums the H heads in order (fp32) and rounds once. The per-dot accumulation order (d = 0..D-1) and
the head-sum order do not depend on the tiling, so every tile configuration gives the same bits.

Keys at or beyond a query's visible count (optional) score -inf, as the attention's mask does.
"""

import math
from typing import Optional, Sequence, Union

import mlx.core as mx

from . import backend, prefill_index
from ..layers import indexer as layer

BODY = """
constexpr int HG = H / HT;                 // head groups
constexpr int NT = HG * SLOTS;             // threads per group
constexpr int TK = SLOTS * KW;             // keys per group
constexpr int KS = TK + 1;                 // padded row of the staged key chunk (fewer bank conflicts)
constexpr int KOFF = BK * H;               // staged keys follow the staged queries
constexpr int QPER = (H * BK + NT - 1) / NT;
constexpr int KPER = (TK * BK + NT - 1) / NT;
constexpr int STAGE = BK * H + BK * KS;
constexpr int SMEM = STAGE > H * TK ? STAGE : H * TK;  // staging, then the per-(head, key) terms
SHARED float smem[SMEM];

const int n = info[0];
const int nq = info[1];
const int qi = GROUP_Y;
const int b = GROUP_Z;
const int tile0 = GROUP_X * TK;
const uint row = uint(b) * uint(nq) + uint(qi);
int limit = n;
if (MASK) {
  const int count = info[2 + qi];
  limit = count < n ? count : n;
}
if (tile0 >= limit) {  // no visible key in this tile
  for (int k = TID; k < TK; k += NT) {
    const int w = tile0 + k;
    if (w < n) scores[row * uint(n) + uint(w)] = static_cast<T>(NEG_INF);
  }
  return;
}

const int slot = TID % SLOTS;
const int hg = TID / SLOTS;
const uint qbase = row * uint(H * D);
const uint kbase = uint(b) * uint(n) * uint(D);

float qpre[QPER];
float kpre[KPER];
#pragma unroll
for (int i = 0; i < QPER; ++i) {
  const int e = TID + NT * i;
  if (e < H * BK) qpre[i] = static_cast<float>(q[qbase + uint((e % H) * D + e / H)]);
}
#pragma unroll
for (int i = 0; i < KPER; ++i) {
  const int e = TID + NT * i;
  const int w = tile0 + e / BK;
  if (e < TK * BK) kpre[i] = w < n ? static_cast<float>(keys[kbase + uint(w) * uint(D) + uint(e % BK)]) : 0.0f;
}

float acc[HT][KW];
#pragma unroll
for (int i = 0; i < HT; ++i) {
#pragma unroll
  for (int j = 0; j < KW; ++j) acc[i][j] = 0.0f;
}

for (int d0 = 0; d0 < D; d0 += BK) {
#pragma unroll
  for (int i = 0; i < QPER; ++i) {
    const int e = TID + NT * i;
    if (e < H * BK) smem[(e / H) * H + e % H] = qpre[i];
  }
#pragma unroll
  for (int i = 0; i < KPER; ++i) {
    const int e = TID + NT * i;
    if (e < TK * BK) smem[KOFF + (e % BK) * KS + e / BK] = kpre[i];
  }
  BARRIER();
  const int d1 = d0 + BK;
  if (d1 < D) {  // the next chunk travels while this one is used
#pragma unroll
    for (int i = 0; i < QPER; ++i) {
      const int e = TID + NT * i;
      if (e < H * BK) qpre[i] = static_cast<float>(q[qbase + uint((e % H) * D + d1 + e / H)]);
    }
#pragma unroll
    for (int i = 0; i < KPER; ++i) {
      const int e = TID + NT * i;
      const int w = tile0 + e / BK;
      if (e < TK * BK) kpre[i] = w < n ? static_cast<float>(keys[kbase + uint(w) * uint(D) + uint(d1 + e % BK)]) : 0.0f;
    }
  }
#pragma unroll
  for (int d = 0; d < BK; ++d) {
    float qv[HT];
    float kv[KW];
#pragma unroll
    for (int i = 0; i < HT; ++i) qv[i] = smem[d * H + hg * HT + i];
#pragma unroll
    for (int j = 0; j < KW; ++j) kv[j] = smem[KOFF + d * KS + slot + SLOTS * j];
#pragma unroll
    for (int i = 0; i < HT; ++i) {
#pragma unroll
      for (int j = 0; j < KW; ++j) acc[i][j] += qv[i] * kv[j];
    }
  }
  BARRIER();
}

// term[h][key] = T(T(relu(T(dot))) * weight[h]): exact in T, kept as float
#pragma unroll
for (int i = 0; i < HT; ++i) {
  const int h = hg * HT + i;
  const float wh = static_cast<float>(weights[row * uint(H) + uint(h)]);
#pragma unroll
  for (int j = 0; j < KW; ++j) {
    float s = static_cast<float>(static_cast<T>(acc[i][j]));
    s = s > 0.0f ? s : 0.0f;
    smem[h * TK + slot + SLOTS * j] = static_cast<float>(static_cast<T>(s * wh));
  }
}
BARRIER();
for (int k = TID; k < TK; k += NT) {
  const int w = tile0 + k;
  if (w < n) {
    float total = 0.0f;
    for (int h = 0; h < H; ++h) total += smem[h * TK + k];
    scores[row * uint(n) + uint(w)] = w < limit ? static_cast<T>(total) : static_cast<T>(NEG_INF);
  }
}
"""

KERNEL = backend.kernel("ds4_indexer_scores", ["q", "weights", "keys", "info"], ["scores"], BODY)

# Tiling. Per thread: HEADS x keys accumulators; SLOTS threads per head group; DEPTH dimensions staged
# at a time. Keys per thread shrink (8, 4, 2, 1) until there are TARGET_GROUPS groups (or KW = 1).
HEADS = 8
SLOTS = 16
DEPTH = 16
MAX_KEYS = 8
TARGET_GROUPS = 256  # about two per SM of an H100 (132 SMs)
MAX_QUERIES = 8  # decode and a few speculative tokens; longer blocks use the reference (GEMM) path
FLOAT_TYPES = (mx.bfloat16, mx.float16, mx.float32)


def _heads_per_thread(n_heads: int) -> int:
    return max(t for t in range(1, HEADS + 1) if n_heads % t == 0)


def _keys_per_thread(n_keys: int, rows: int) -> int:
    kw = MAX_KEYS
    while kw > 1 and math.ceil(n_keys / (SLOTS * kw)) * rows < TARGET_GROUPS:
        kw //= 2
    return kw


def applies(q: mx.array, weights: mx.array, keys: mx.array) -> bool:
    """Whether the kernel handles these shapes and dtypes (else the wrapper runs the reference)."""
    if q.ndim != 4 or keys.ndim != 3 or weights.ndim != 3:
        return False
    batch, n_queries, n_heads, head_dim = q.shape
    n_keys = keys.shape[1]
    ht = _heads_per_thread(n_heads)
    return (1 <= n_queries <= MAX_QUERIES and n_keys >= 1 and keys.shape[0] == batch and keys.shape[2] == head_dim
            and tuple(weights.shape) == (batch, n_queries, n_heads)
            and q.dtype in FLOAT_TYPES and weights.dtype == q.dtype and keys.dtype in FLOAT_TYPES
            and (n_heads // ht) * SLOTS <= 1024 and batch * n_keys * head_dim < 2**31 and head_dim >= 1)


def index_scores(q: mx.array, weights: mx.array, keys: mx.array,
                 visible: Optional[Union[Sequence[int], mx.array]] = None) -> mx.array:
    """q [B, Q, H, Dh], weights [B, Q, H], keys [B, N, Dh] -> index scores [B, Q, N] in q's dtype.

    visible: optional per-query count of visible keys ([Q] ints or int array); keys w >= count
    score -inf. Few queries (decode) run this module's kernel, more (prefill) custom_kernels/prefill_index.py's on
    CUDA; the rest run `layer.reference_scores`."""

    def reference():
        return [layer.reference_scores(q, weights, keys, visible)]

    prefill = q.ndim == 4 and q.shape[1] > MAX_QUERIES and prefill_index.applies(q, weights, keys)
    if not prefill and not applies(q, weights, keys):
        return reference()[0]
    batch, n_queries, n_heads, head_dim = q.shape
    n_keys = keys.shape[1]
    if visible is None:
        info = mx.array([n_keys, n_queries], dtype=mx.int32)
    elif isinstance(visible, mx.array):
        info = mx.concatenate([mx.array([n_keys, n_queries], dtype=mx.int32), visible.reshape(-1).astype(mx.int32)])
    else:
        info = mx.array([n_keys, n_queries, *[int(c) for c in visible]], dtype=mx.int32)
    if prefill:
        return prefill_index.index_scores(q, weights, keys, info, visible is not None, reference)
    ht = _heads_per_thread(n_heads)
    kw = _keys_per_thread(n_keys, batch * n_queries)
    threads = (n_heads // ht) * SLOTS
    tiles = math.ceil(n_keys / (SLOTS * kw))
    template = [("T", q.dtype), ("H", n_heads), ("D", head_dim), ("HT", ht), ("KW", kw), ("SLOTS", SLOTS),
                ("BK", math.gcd(head_dim, DEPTH)), ("MASK", visible is not None)]
    return KERNEL.run([q, weights, keys, info], template, grid=(tiles * threads, n_queries, batch),
                      threadgroup=(threads, 1, 1), output_shapes=[(batch, n_queries, n_keys)],
                      output_dtypes=[q.dtype], reference=reference)[0]
