"""The MoE router's top-k as one kernel launch: from the gate's fp32 logits, each expert's score sqrt(softplus(l)),
the k experts of the largest score + bias, and their scores normalised to sum to one, times the route scale.

One thread group per token, one thread per expert (the group rounded up to whole SIMD groups): k rounds of a group
maximum of the biased scores not yet picked (ties to the lower expert index), then the first k threads normalise
the picked scores (summed in pick order). The pure-MLX
reference (layers/moe.py, Gate) is ~6 launching ops (the scores, the bias, argpartition, the gather, the sum and
the scaling); picks agree with it unless two biased scores tie (its order among the k is its own), and the
weights to fp32 rounding.
"""

from typing import Callable, Tuple

import mlx.core as mx

from . import backend

MAX_ROWS = 8  # decode-sized: up to this many tokens (more: the reference)

_BODY = """
constexpr int WARPS = NT / 32;  // NT: E rounded up to whole SIMD groups; threads past E hold -inf
SHARED float best_value[WARPS];
SHARED int best_index[WARPS];
SHARED float picked_score[K];
SHARED int picked[K];
const uint row = GROUP_X;
const int e = int(TID);
const float logit = e < E ? logits[row * uint(E) + uint(e)] : 0.0f;
const float score = SQRT(FMAX(logit, 0.0f) + LOG(1.0f + EXP(-(logit < 0.0f ? -logit : logit))));  // sqrt(softplus)
float biased = e < E ? score + bias[e] : NEG_INF;
for (int round = 0; round < K; ++round) {
  const float top = WARP_MAX(biased);
  const float lowest = -WARP_MAX(biased == top ? -float(e) : NEG_INF);  // the lowest index holding the maximum
  if (LANE == 0u) {
    best_value[WARP] = top;
    best_index[WARP] = int(lowest);
  }
  BARRIER();
  float winner_value = best_value[0];
  int winner = best_index[0];
  for (int w = 1; w < WARPS; ++w)
    if (best_value[w] > winner_value) {
      winner_value = best_value[w];
      winner = best_index[w];
    }
  if (e == winner) {
    picked[round] = e;
    picked_score[round] = score;
    biased = NEG_INF;
  }
  BARRIER();
}
if (e < K) {
  float total = 0.0f;
  for (int i = 0; i < K; ++i) total += picked_score[i];
  weights[row * uint(K) + uint(e)] = picked_score[e] / total * scale[0];
  indices[row * uint(K) + uint(e)] = picked[e];
}
"""

KERNEL = backend.kernel("route_top_k", ["logits", "bias", "scale"], ["weights", "indices"], _BODY)


def top_k(logits: mx.array, bias: mx.array, k: int, route_scale: float,
          reference: Callable[[], Tuple[mx.array, mx.array]]) -> Tuple[mx.array, mx.array]:
    """logits [N, E] fp32, bias [E] fp32 -> (weights [N, k] fp32, expert indices [N, k] int32), as `reference()`."""
    rows, experts = logits.shape
    threads = -(-experts // 32) * 32
    if (backend.backend() is None or logits.dtype != mx.float32 or bias.dtype != mx.float32 or not 0 < rows <= MAX_ROWS
            or threads > 1024 or not 0 < k <= experts):
        return reference()
    out = KERNEL.run([logits, bias, backend.float_input(route_scale)], [("E", experts), ("K", k), ("NT", threads)],
                     grid=(rows * threads, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[(rows, k)] * 2,
                     output_dtypes=[mx.float32, mx.int32], reference=lambda: list(reference()))
    return out[0], out[1]
