"""The low-precision simulations of DeepSeek's official inference code, and its normalisations.

The official model stores the non-RoPE KV dims as FP8, feeds FP8 activations to its FP8/FP4
linears and compares indexer queries and keys after a Hadamard rotation and an FP4 round trip.
These functions reproduce those roundings exactly (power-of-two scales, round to nearest even).
"""

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import compiled
from ..custom_kernels import norm as norm_kernels
from ..custom_kernels import rounding

FP8_MAX = 448.0  # largest e4m3 value
DECODE_SIZE = 1 << 16  # elements: inputs up to this size are decode-sized
FP4_MAX = 6.0  # largest e2m1 value


def fused_for_decode(fn):
    """`fn` with its chain of element-wise ops fused by `mx.compile` where it pays: on a GPU (and on the
    CPU when tests force compiled graphs there; compiled.on_device), for decode-sized inputs: one kernel
    launch instead of one per op, and shapes repeat every step. Large (prefill) inputs, whose shapes vary
    and whose launches are amortised, run `fn` as written. Non-array arguments must be hashable
    constants such as numbers or strings (they key the compiled graph; not functions)."""
    fused = mx.compile(fn)

    def call(x: mx.array, *args):
        if x.size <= DECODE_SIZE and compiled.on_device():
            return fused(x, *args)
        return fn(x, *args)

    return call


def _pow2(exponent: mx.array) -> mx.array:
    """2**exponent as float32, built from the exponent bits (exponent in [-126, 127])."""
    return ((exponent + 127) << 23).astype(mx.uint32).view(mx.float32)


def _ceil_log2(x: mx.array) -> mx.array:
    """ceil(log2(x)) for positive normal float32 x, as the official kernels compute it."""
    bits = x.view(mx.uint32)
    exponent = (bits >> 23).astype(mx.int32) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).astype(mx.int32)


def _e4m3(y: mx.array) -> mx.array:
    """Round float32 y (|y| <= 448) to FP8 e4m3 (3 mantissa bits, subnormals below 2^-6), ties to
    even: MLX's own conversion (tests compare it with a grid rounding at every value and midpoint)."""
    return mx.from_fp8(mx.to_fp8(y), mx.float32)


def _e2m1(y: mx.array) -> mx.array:
    """Round float32 y (|y| <= 6) to FP4 e2m1 {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to even: steps of
    0.5 below 2, 1 below 4, 2 above (tests compare it with a grid rounding at every value and midpoint)."""
    magnitude = mx.abs(y)
    quantum = mx.where(magnitude < 2, 0.5, mx.where(magnitude < 4, 1.0, 2.0))
    return mx.round(y / quantum) * quantum


_ROUND = {"e4m3": _e4m3, "e2m1": _e2m1}  # by name: compiled functions take constants, not functions


@fused_for_decode
def _block_round_trip(x, block, fmt_max, amax_floor, fmt):
    shape, dtype = x.shape, x.dtype
    blocks = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // block, block)
    amax = mx.maximum(mx.max(mx.abs(blocks), axis=-1, keepdims=True), amax_floor)
    scale = _pow2(_ceil_log2(amax * mx.array(1.0 / fmt_max, mx.float32)))
    y = _ROUND[fmt](mx.clip(blocks / scale, -fmt_max, fmt_max))
    return (y * scale).reshape(shape).astype(dtype)


FORMATS = {"e4m3": (FP8_MAX, 1e-4), "e2m1": (FP4_MAX, FP4_MAX * 2.0**-126)}  # (largest value, amax floor)


def _round_trip(x: mx.array, block: int, fmt: str) -> mx.array:
    """The block round trip: one kernel launch where there is a GPU backend, else `_block_round_trip`."""
    fmt_max, amax_floor = FORMATS[fmt]
    return rounding.block_round_trip(x, block, fmt, fmt_max, amax_floor,
                                     lambda: _block_round_trip(x, block, fmt_max, amax_floor, fmt))


def fp8_round_trip(x: mx.array, block: int) -> mx.array:
    """Quantize to FP8 e4m3 with one power-of-two scale per `block` values and back."""
    return _round_trip(x, block, "e4m3")


def fp4_round_trip(x: mx.array, block: int = 32) -> mx.array:
    """Quantize to FP4 e2m1 with one power-of-two scale per `block` values and back."""
    return _round_trip(x, block, "e2m1")


@lru_cache(maxsize=4)
def hadamard_matrix(n: int) -> mx.array:
    """Sylvester-ordered Walsh-Hadamard matrix scaled by n**-0.5 (orthonormal, symmetric)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = mx.ones((1, 1), dtype=mx.float32)
    while h.shape[0] < n:
        h = mx.concatenate([mx.concatenate([h, h], 1), mx.concatenate([h, -h], 1)], 0)
    return h * (1.0 / math.sqrt(n))


def hadamard_rotate(x: mx.array) -> mx.array:
    """Rotate the last axis by the orthonormal Hadamard matrix (fp32 math, input dtype out)."""
    return _rotate(x, hadamard_matrix(x.shape[-1]))


@fused_for_decode
def _rotate(x: mx.array, matrix: mx.array) -> mx.array:
    return (x.astype(mx.float32) @ matrix).astype(x.dtype)


def fp8_input(x: mx.array, enabled: bool) -> mx.array:
    """What an official FP8/FP4 linear sees of its input when FP8 activations are simulated."""
    return fp8_round_trip(x, 128) if enabled else x


def fp8_kv(rows: mx.array, rope_dims: int) -> mx.array:
    """FP8 round trip (block 64) of the non-RoPE dims of KV rows; the RoPE dims stay as they are."""
    fmt_max, amax_floor = FORMATS["e4m3"]
    return rounding.block_round_trip(rows, 64, "e4m3", fmt_max, amax_floor, lambda: _fp8_kv(rows, rope_dims),
                                     rounded=rows.shape[-1] - rope_dims)


def kv_rows(norm: "RMSNorm", rope, x: mx.array, positions: mx.array, fp8: bool) -> mx.array:
    """KV rows as the attention and the compressors make them from x [B, L, D]: normed, RoPE'd at positions [L]
    (`rope`: layers/rope.py's RoPE), FP8-rounded (fp8_kv) if `fp8`; one kernel launch on a GPU
    (custom_kernels/norm.py)."""
    def reference():
        rows = rope(norm(x), positions)
        return fp8_kv(rows, rope.dims) if fp8 else rows

    return norm_kernels.rms_norm_rope(x, norm.weight, norm.eps, positions, rope.dim_freq,
                                      FORMATS["e4m3"] if fp8 else None, reference)


@fused_for_decode
def _fp8_kv(rows: mx.array, rope_dims: int) -> mx.array:
    nope = _block_round_trip(rows[..., :-rope_dims], 64, *FORMATS["e4m3"], "e4m3")
    return mx.concatenate([nope, rows[..., -rope_dims:]], axis=-1)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 (weight multiplied in fp32) and cast back once, as officially; one kernel launch
    on a GPU (custom_kernels/norm.py)."""

    def __call__(self, x: mx.array) -> mx.array:
        return norm_kernels.rms_norm(x, self.weight, self.eps, lambda: self.reference(x))

    def reference(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps).astype(x.dtype)
