"""DeepSeek V4 MoE: `num_experts_per_tok` routed experts out of `n_routed_experts` plus one
shared expert, all clamped SwiGLU.

Routing: scores = sqrt(softplus(x @ gate^T)) in fp32. The first `num_hash_layers` layers pick
experts by token id (`tid2eid`); the others pick the top-k of scores + bias. The route weights
are the unbiased scores of the picked experts, normalised to sum 1, times the scaling factor,
and multiply the activation before the down projection.
"""

import mlx.core as mx
import mlx.nn as nn
from .linear import Linear, StackedLinear

from ..config import ModelArgs
from ..custom_kernels import moe as moe_kernels  # its fallback is routed_experts_reference below
from ..custom_kernels import route, row_product
from .numerics import fp8_input


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """silu(min(gate, limit)) * clip(up, -limit, limit), in fp32."""
    gate, up = gate.astype(mx.float32), up.astype(mx.float32)
    if limit > 0:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


def sort_by_expert(x: mx.array, weights: mx.array, indices: mx.array):
    """The N * k token-expert rows grouped by expert: (order [N*k] (row r is flat row order[r]),
    their experts [N*k] ascending, their tokens' x [N*k, 1, dim], their route weights [N*k])."""
    n_tokens, k = indices.shape
    flat = indices.reshape(-1)
    order = mx.argsort(flat)
    # a reshape, not x[...][:, None]: MLX 0.32.4's CUDA gather_mm misreads an lhs made by
    # expanding a gathered array
    rows = x[order // k].reshape(n_tokens * k, 1, -1)
    return order, flat[order], rows, weights.reshape(-1)[order]


def expert_hidden(gate: mx.array, up: mx.array, route: mx.array, limit: float, dtype,
                  fp8_activations: bool) -> mx.array:
    """The down projection's input [R, 1, inter]: route [R] times the clamped SwiGLU of the gate
    and up products, rounded to the activation dtype (then FP8-simulated where the model does)."""
    hidden = (clamped_swiglu(gate, up, limit) * route[:, None, None]).astype(dtype)
    return fp8_input(hidden, fp8_activations)


def unsorted_sum(out: mx.array, order: mx.array, k: int) -> mx.array:
    """Per-row outputs [N*k, 1, dim] in expert order -> each token's sum over its k experts, fp32 [N, dim]."""
    out = out[mx.argsort(order)].reshape(-1, k, out.shape[-1])
    return mx.sum(out.astype(mx.float32), axis=1)


def routed_experts_reference(x: mx.array, weights: mx.array, indices: mx.array, w1, w2, w3, limit: float,
                             fp8_activations: bool) -> mx.array:
    """x [N, dim], weights/indices [N, k] -> sum over k of weight * expert(x), fp32 [N, dim]
    (the stacked linears w1/w3 [E, inter, dim], w2 [E, dim, inter] through gather_qmm / gather_mm)."""
    order, experts, rows, route = sort_by_expert(x, weights, indices)
    gate, up = w1(rows, experts, sorted_indices=True), w3(rows, experts, sorted_indices=True)
    hidden = expert_hidden(gate, up, route, limit, x.dtype, fp8_activations)
    return unsorted_sum(w2(hidden, experts, sorted_indices=True), order, indices.shape[1])


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.route_scale = args.routed_scaling_factor
        self.hash = layer_id < args.num_hash_layers
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if self.hash:
            self.tid2eid = mx.zeros((args.vocab_size, self.top_k), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)

    def __call__(self, x: mx.array, token_ids: mx.array):
        """x [N, dim], token_ids [N] -> (weights [N, k] fp32, expert indices [N, k])."""
        logits = row_product.single(x, self.weight, lambda: x.astype(mx.float32) @ self.weight.astype(mx.float32).T)
        if self.hash:
            return self._weights(logits, self.tid2eid[token_ids])
        return route.top_k(logits, self.bias, self.top_k, self.route_scale, lambda: self._top_k(logits))

    def _top_k(self, logits: mx.array):
        """The pure-MLX routing of non-hash layers: the top-k of score + bias."""
        biased = mx.sqrt(mx.logaddexp(logits, 0.0)) + self.bias
        return self._weights(logits, mx.argpartition(-biased, self.top_k - 1, axis=-1)[:, : self.top_k])

    def _weights(self, logits: mx.array, indices: mx.array):
        """(the chosen experts' scores normalised to sum to one, times the route scale; indices)."""
        weights = mx.sqrt(mx.logaddexp(mx.take_along_axis(logits, indices, axis=-1), 0.0))
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
        return weights * self.route_scale, indices


class SharedExpert(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.hidden_size, args.moe_intermediate_size)
        self.w2 = Linear(args.moe_intermediate_size, args.hidden_size)
        self.w3 = Linear(args.hidden_size, args.moe_intermediate_size)
        self.limit = args.swiglu_limit
        self.fp8_activations = args.fp8_activations

    def __call__(self, x: mx.array) -> mx.array:
        hidden = clamped_swiglu(self.w1(x), self.w3(x), self.limit).astype(x.dtype)
        return self.w2(fp8_input(hidden, self.fp8_activations))


class RoutedExperts(nn.Module):
    """All routed experts stacked: w1/w3 [E, inter, dim], w2 [E, dim, inter]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, inter, n = args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        self.w1 = StackedLinear(dim, inter, n)
        self.w2 = StackedLinear(inter, dim, n)
        self.w3 = StackedLinear(dim, inter, n)
        self.limit = args.swiglu_limit
        self.fp8_activations = args.fp8_activations

    def __call__(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        """x [N, dim], weights/indices [N, k] -> sum over k of weight * expert(x), fp32 [N, dim]."""
        return moe_kernels.routed_experts(x, weights, indices, self.w1, self.w2, self.w3, self.limit,
                                          self.fp8_activations)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.gate = Gate(args, layer_id)
        self.experts = RoutedExperts(args)
        self.shared_experts = SharedExpert(args)
        self.fp8_activations = args.fp8_activations

    def __call__(self, x: mx.array, token_ids: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, token_ids.reshape(-1))
        x_in = fp8_input(x, self.fp8_activations)
        out = moe_kernels.experts(x_in, weights, indices, self.experts, self.shared_experts, self.experts.limit,
                                  self.fp8_activations)  # decode on a GPU: routed and shared in two launches
        if out is None:
            out = (self.experts(x_in, weights, indices) + self.shared_experts(x_in)).astype(x.dtype)
        return out.reshape(shape)
