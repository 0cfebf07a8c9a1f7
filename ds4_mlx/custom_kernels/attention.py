"""Decode attention (a few queries) in two launches, flash-decoding style.

Every query attends, in one softmax with a per-head sink, to its window keys (the ring rows of
`WindowCache.window_keys`, empty slots skipped) and to compressed rows: all visible rows on HCA
layers (and CSA layers with no more rows than top-k), the indexer's picks on CSA layers, read by
index (no gathered copy). One 512-wide KV head serves every query head, and keys are values.

`attend_partial`: the key axis (window keys, then compressed candidates) is cut into splits; a
thread group handles one split for a set of GH = HPW * HQ heads. Each warp holds the queries of
HPW heads in registers (lane l owns dims l, l + 32, ...), streams every KS-th key of the split
(one coalesced row read, prefetched one key ahead, used for the scores of its HPW heads and for
their P @ V), and keeps an online softmax (running max m, fp32 sum l, fp32 sum of P V with P
rounded to the activation dtype, as the official kernel does). The HQ warps of a key stream read
the same rows (served by L1), the KS streams merge in shared memory, and the group writes one
partial (m, l, acc[D]) per head. `attend_combine` rescales the partials of every split to the
global max, adds the sink exp(sink - max) to the denominator and writes the output.

The only difference from the pure-MLX reference is where P is rounded: relative to the running
max of the split instead of the global max (P is rounded to bf16 either way, with the same 2^-9
relative error bound per probability), and the fp32 summation order.
"""

import math
from typing import Callable, Optional, Tuple

import mlx.core as mx

from . import backend

MAX_QUERIES = 8  # longer query chunks (prefill) take the pure-MLX query-block path
HEADS_PER_WARP = 4  # queries and accumulators of 4 heads x 16 dims per lane at head_dim 512
HEAD_SETS = 2  # warps per key stream, each with its own heads (HQ)
KEY_STREAMS = 2  # warps per head set, each on its own keys of the split (KS)
TARGET_GROUPS = 264  # thread groups to aim for at least (2 per SM on an H100)
MIN_KEYS_PER_WARP = 4
MAX_KEYS_PER_WARP = 64  # more keys: more splits
MAX_SPLITS = 1024  # the combine kernel's shared weight buffer

PARTIAL_BODY = """
  constexpr int DPL = D / 32;
  constexpr int GH = HPW * HQ;
  constexpr int NG = H / GH;
  const int start = meta[0];
  const int n_rows = meta[1];
  const int n_cand = meta[2];
  const int kps = meta[3];
  const int n_split = meta[4];
  const int split = GROUP_X / NG;
  const int hg = GROUP_X % NG;
  const int qi = GROUP_Y;
  const int b = GROUP_Z;
  const int hset = WARP % HQ;
  const int stream = WARP / HQ;
  const int hl = hset * HPW;          // first head of this warp in the group
  const int h0 = hg * GH + hl;        // first head of this warp
  const int t = start + qi;           // the query's position
  const float scale = scale_in[0];
  // window key u is ring row qi + 1 + u at position t - W + 1 + u: empty below u = W - 1 - t
  const int window_first = W - 1 - t;
  int n_dense = 0;
  if (RATIO > 0) {
    n_dense = (t + 1) / (RATIO > 0 ? RATIO : 1);
    n_dense = n_dense < n_rows ? n_dense : n_rows;
  }

  float qv[HPW][DPL];
  float acc[HPW][DPL];
  float m[HPW];
  float l[HPW];
  const uint q_base = (uint)(((b * Q + qi) * H + h0) * D);
  for (int h = 0; h < HPW; ++h) {
    m[h] = NEG_INF;
    l[h] = 0.0f;
    for (int i = 0; i < DPL; ++i) {
      qv[h][i] = static_cast<float>(q[q_base + h * D + LANE + 32 * i]);
      acc[h][i] = 0.0f;
    }
  }

  const int total = W + n_cand;
  const int u_begin = split * kps;
  const int u_end = u_begin + kps < total ? u_begin + kps : total;
  const uint w_base = (uint)((b * (W + Q) + qi + 1) * D);
  const uint c_base = (uint)b * (uint)n_rows * (uint)D;
  const int p_base = (b * Q + qi) * n_cand;

  // Key u of the split goes to stream (u - u_begin) % KS. `src` locates it: -1 not visible,
  // [0, W) window row, W + r compressed row r. The next key's row is loaded one step ahead.
  float kn[DPL];
  for (int i = 0; i < DPL; ++i) kn[i] = 0.0f;
  int src_next = -1;
  for (int u = u_begin + stream - KS; u < u_end; u += KS) {
    const int src = src_next;
    float k[DPL];
    for (int i = 0; i < DPL; ++i) k[i] = kn[i];
    const int un = u + KS;
    src_next = -1;
    if (un < u_end) {
      if (un < W) {
        src_next = un >= window_first ? un : -1;
      } else if (PICKS) {
        const int row = picks[p_base + un - W];
        src_next = row >= 0 ? W + row : -1;
      } else {
        src_next = un - W < n_dense ? un : -1;
      }
      if (src_next >= W) {
        const uint base = c_base + (uint)(src_next - W) * (uint)D + LANE;
        for (int i = 0; i < DPL; ++i) kn[i] = static_cast<float>(comp[base + 32 * i]);
      } else if (src_next >= 0) {
        const uint base = w_base + (uint)(src_next * D) + LANE;
        for (int i = 0; i < DPL; ++i) kn[i] = static_cast<float>(wkeys[base + 32 * i]);
      }
    }
    if (src < 0) continue;  // the same for every lane of the warp
    for (int h = 0; h < HPW; ++h) {
      float dot = 0.0f;
      for (int i = 0; i < DPL; ++i) dot += qv[h][i] * k[i];
      const float s = WARP_SUM(dot) * scale;
      if (s > m[h]) {
        const float c = EXP(m[h] - s);
        l[h] *= c;
        for (int i = 0; i < DPL; ++i) acc[h][i] *= c;
        m[h] = s;
      }
      const float p = EXP(s - m[h]);
      l[h] += p;
      const float pr = static_cast<float>(static_cast<TQ>(p));
      for (int i = 0; i < DPL; ++i) acc[h][i] += pr * k[i];
    }
  }

  // merge the KS streams of each head set: rescale to the group max, sum through shared memory
  SHARED float sm_m[KS * GH];
  SHARED float sm_l[KS * GH];
  SHARED float sm_acc[KS > 1 ? GH * D : 1];
  if (LANE == 0) {
    for (int h = 0; h < HPW; ++h) sm_m[stream * GH + hl + h] = m[h];
  }
  BARRIER();
  for (int h = 0; h < HPW; ++h) {
    float peak = NEG_INF;
    for (int r = 0; r < KS; ++r) peak = FMAX(peak, sm_m[r * GH + hl + h]);
    const float c = m[h] == NEG_INF ? 0.0f : EXP(m[h] - peak);
    l[h] *= c;
    for (int i = 0; i < DPL; ++i) acc[h][i] *= c;
    m[h] = peak;
  }
  if (LANE == 0) {
    for (int h = 0; h < HPW; ++h) sm_l[stream * GH + hl + h] = l[h];
  }
  BARRIER();
  for (int r = 1; r < KS; ++r) {
    if (stream == r) {
      for (int h = 0; h < HPW; ++h) {
        for (int i = 0; i < DPL; ++i) {
          const int j = (hl + h) * D + LANE + 32 * i;
          sm_acc[j] = (r == 1 ? 0.0f : sm_acc[j]) + acc[h][i];
        }
      }
    }
    BARRIER();
  }
  if (stream == 0) {
    for (int h = 0; h < HPW; ++h) {
      float lt = 0.0f;
      for (int r = 0; r < KS; ++r) lt += sm_l[r * GH + hl + h];
      const int row = ((b * Q + qi) * H + h0 + h) * n_split + split;
      for (int i = 0; i < DPL; ++i) {
        const int j = (hl + h) * D + LANE + 32 * i;
        part[(uint)row * (uint)D + LANE + 32 * i] = acc[h][i] + (KS > 1 ? sm_acc[j] : 0.0f);
      }
      if (LANE == 0) {
        stats[2 * row] = m[h];
        stats[2 * row + 1] = lt;
      }
    }
  }
"""

COMBINE_BODY = """
  const int n_split = meta[4];
  const int chunks = D / NTHREADS;
  const int h = GROUP_X / chunks;
  const int d = (GROUP_X % chunks) * NTHREADS + TID;
  const int row = (GROUP_Z * Q + GROUP_Y) * H + h;
  const int nwarps = (NTHREADS + 31) / 32;
  SHARED float weight[MAXS];
  SHARED float red[32];

  float peak = NEG_INF;
  for (int s = TID; s < n_split; s += NTHREADS) peak = FMAX(peak, stats[2 * (row * n_split + s)]);
  peak = WARP_MAX(peak);
  if (LANE == 0) red[WARP] = peak;
  BARRIER();
  peak = NEG_INF;
  for (int j = 0; j < nwarps; ++j) peak = FMAX(peak, red[j]);
  BARRIER();

  float den = 0.0f;
  for (int s = TID; s < n_split; s += NTHREADS) {
    const float ms = stats[2 * (row * n_split + s)];
    const float ws = ms == NEG_INF ? 0.0f : EXP(ms - peak);
    weight[s] = ws;
    den += ws * stats[2 * (row * n_split + s) + 1];
  }
  den = WARP_SUM(den);
  if (LANE == 0) red[WARP] = den;
  BARRIER();
  den = 0.0f;
  for (int j = 0; j < nwarps; ++j) den += red[j];
  den += EXP(sink[h] - peak);

  float o = 0.0f;
  for (int s = 0; s < n_split; ++s) o += weight[s] * part[(uint)(row * n_split + s) * (uint)D + d];
  out[(uint)row * (uint)D + d] = static_cast<TQ>(o / den);
"""

PARTIAL = backend.kernel("ds4_attend_partial", ["q", "wkeys", "comp", "picks", "scale_in", "meta"],
                         ["part", "stats"], PARTIAL_BODY)
COMBINE = backend.kernel("ds4_attend_combine", ["part", "stats", "sink", "meta"], ["out"], COMBINE_BODY)


def _layout(heads: int, dims: int) -> Tuple[int, int]:
    """(heads per warp, head sets per group): the merge buffer of KS > 1 streams, heads x dims
    fp32, stays within 16 KB (Metal allows 32 KB of threadgroup memory)."""
    hpw = next(n for n in (HEADS_PER_WARP, 4, 2, 1) if heads % n == 0)
    hq = next(n for n in range(HEAD_SETS, 0, -1)
              if (heads // hpw) % n == 0 and (KEY_STREAMS == 1 or n * hpw * dims * 4 <= 16384)
              and 32 * n * KEY_STREAMS <= 1024)
    return hpw, hq


def _plan(batch: int, queries: int, keys: int, head_groups: int) -> Tuple[int, int]:
    """(keys per split, splits): enough thread groups to fill the GPU and no more than
    MAX_KEYS_PER_WARP keys per warp, but few enough splits to keep the partials (heads x head_dim
    fp32 per split) small and at least MIN_KEYS_PER_WARP keys per warp."""
    fill = -(-TARGET_GROUPS // (head_groups * queries * batch))
    splits = max(fill, -(-keys // (KEY_STREAMS * MAX_KEYS_PER_WARP)))
    splits = min(splits, max(1, keys // (KEY_STREAMS * MIN_KEYS_PER_WARP)), MAX_SPLITS)
    per = -(-keys // splits)
    per = -(-per // KEY_STREAMS) * KEY_STREAMS
    return per, -(-keys // per)


def pick_rows(selection: Tuple[mx.array, Optional[mx.array]]) -> mx.array:
    """The indexer's selection (rows [B, Q, k], valid [B, Q, k] or None: all valid) as the kernels read it:
    row indices, int32, -1 where a pick is not valid."""
    rows, valid = selection
    return rows.astype(mx.int32) if valid is None else mx.where(valid, rows.astype(mx.int32), -1)


def decode_attention(q: mx.array, window_keys: mx.array, compressed: Optional[mx.array],
                     selection: Optional[Tuple[mx.array, mx.array]], sink: mx.array, *, start: int, ratio: int,
                     scale: float, reference: Callable[[], mx.array]) -> mx.array:
    """Attention of queries q [B, Q, H, D] at positions start.. over one shared KV head.

    window_keys [B, W + Q, D]: `WindowCache.window_keys` (key i at position start - W + i; query
    j sees keys j + 1 .. j + W, those at negative positions are empty). compressed [B, N, D] or
    None: compressed rows, row w visible to position t when w < (t + 1) // ratio, unless
    `selection` = (picks [B, Q, k], valid [B, Q, k] or None: all valid) gives each query its rows. sink [H] fp32.
    Returns [B, Q, H, D] in q's dtype; `reference()` computes the same with pure-MLX ops.
    """
    batch, queries, heads, dims = q.shape
    window = window_keys.shape[1] - queries
    n_rows = 0 if compressed is None else compressed.shape[1]
    n_cand = n_rows if selection is None or not n_rows else selection[0].shape[-1]
    hpw, hq = _layout(heads, dims)
    head_groups = heads // (hpw * hq)
    per_split, splits = _plan(batch, queries, window + n_cand, head_groups)
    rows = max(n_rows, window + queries)
    if (backend.backend() is None or queries > MAX_QUERIES or dims % 32 or window < 1
            or q.dtype not in backend.FLOATS or window_keys.dtype not in backend.FLOATS
            or (compressed is not None and compressed.dtype not in backend.FLOATS)
            or batch * rows * dims >= 2**31 or batch * queries * heads * splits * dims >= 2**31):
        return reference()

    meta = mx.array([start, n_rows, n_cand, per_split, splits], dtype=mx.int32)
    comp = compressed if n_rows else window_keys  # not read without rows
    picks = pick_rows(selection) if selection is not None and n_rows else meta  # meta: not read
    threads = 32 * hq * KEY_STREAMS
    template = [("TQ", q.dtype), ("H", heads), ("D", dims), ("W", window), ("Q", queries), ("RATIO", ratio),
                ("PICKS", selection is not None and n_rows > 0),
                ("HPW", hpw), ("HQ", hq), ("KS", KEY_STREAMS)]
    # A kernel that cannot run returns [reference()]: one output instead of two.
    first = PARTIAL.run([q, window_keys, comp, picks, mx.array([scale], dtype=mx.float32), meta], template,
                        grid=(splits * head_groups * threads, queries, batch), threadgroup=(threads, 1, 1),
                        output_shapes=[(batch, queries, heads, splits, dims), (batch, queries, heads, splits, 2)],
                        output_dtypes=[mx.float32, mx.float32], reference=lambda: [reference()])
    if len(first) == 1:
        return first[0]
    part, stats = first
    threads = math.gcd(dims, 128)
    return COMBINE.run([part, stats, sink.astype(mx.float32), meta],
                       [("TQ", q.dtype), ("H", heads), ("D", dims), ("Q", queries), ("MAXS", MAX_SPLITS)],
                       grid=(heads * (dims // threads) * threads, queries, batch), threadgroup=(threads, 1, 1),
                       output_shapes=[q.shape], output_dtypes=[q.dtype], reference=lambda: [reference()])[0]
