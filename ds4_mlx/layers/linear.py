"""Linear layers whose products are computed alike on every backend.

DeepSeek's numerics (and the Metal and CUDA kernels of MLX) multiply half-precision activations
with fp32 accumulation and round the result once. MLX's CPU kernels for quantized and gathered
products accumulate half-precision inputs in half precision (about 1% relative error) or refuse
them, so on the CPU these layers run the product in fp32 and round the result back.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from ..custom_kernels import prefill_matmul


def _exact(product, x: mx.array, *args, **kwargs) -> mx.array:
    if x.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return product(x, *args, **kwargs)
    return product(x.astype(mx.float32), *args, **kwargs).astype(x.dtype)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        """Prefill-sized inputs on CUDA go through the tensor-core kernel (custom_kernels/prefill_matmul.py)."""
        product = super().__call__
        return prefill_matmul.linear(x, self, lambda: _exact(product, x))


class Linear(nn.Linear):
    """A bias-free linear layer; quantizes to `QuantizedLinear`."""

    def __init__(self, input_dims: int, output_dims: int):
        super().__init__(input_dims, output_dims, bias=False)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            raise ValueError("activation quantization is not supported")
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedStackedLinear(QuantizedSwitchLinear):
    def __call__(self, x, indices, sorted_indices=False):
        return _exact(super().__call__, x, indices, sorted_indices)

    def per_group(self, x, group_ids):
        """x [..., G, 1, in] -> [..., G, 1, out], group g through linear g (group_ids = arange(G));
        prefill-sized inputs on CUDA go through the tensor-core kernel."""
        return prefill_matmul.per_group(x, self, lambda: self(x, group_ids))


class StackedLinear(SwitchLinear):
    """`count` bias-free linears stacked [count, out, in] (routed experts, wo_a groups); row r
    of the input goes through the one `indices[r]` picks."""

    def __init__(self, input_dims: int, output_dims: int, count: int):
        super().__init__(input_dims, output_dims, count, bias=False)

    def __call__(self, x, indices, sorted_indices=False):
        return _exact(super().__call__, x, indices, sorted_indices)

    def per_group(self, x, group_ids):
        """x [..., G, 1, in] -> [..., G, 1, out], group g through linear g (group_ids = arange(G))."""
        return self(x, group_ids)

    def to_quantized(self, group_size=64, bits=4, mode="affine", global_scale=False):
        count, output_dims, input_dims = self.weight.shape
        layer = QuantizedStackedLinear(input_dims, output_dims, count, False, group_size, bits, mode=mode)
        layer._quantize(self.weight, global_scale)
        return layer
