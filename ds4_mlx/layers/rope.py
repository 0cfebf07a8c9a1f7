"""Rotary embedding on the trailing dims of a head, interleaved pairs, with DeepSeek's YaRN.

Window-only layers use `rope_theta` without YaRN; compressed layers (and their compressors and
indexer) use `compress_rope_theta` with YaRN. Angles are computed in fp32 from absolute
positions, as the official `precompute_freqs_cis` does.
"""

import math

import mlx.core as mx

from ..config import ModelArgs
from ..custom_kernels import rope as rope_kernel
from .numerics import fused_for_decode


def yarn_inv_freq(dims: int, base: float, scaling: dict | None) -> mx.array:
    """Inverse frequencies [dims/2], YaRN-blended when `scaling` is given."""
    inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(scaling["beta_slow"])), dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    return inv_freq / factor * (1 - smooth) + inv_freq * smooth


class RoPE:
    """Rotates the last `dims` dims of x by the angle position * inv_freq."""

    def __init__(self, args: ModelArgs, compressed: bool):
        self.dims = args.qk_rope_head_dim
        if compressed:
            scaling = args.rope_scaling if (args.rope_scaling or {}).get("type") == "yarn" else None
            inv_freq = yarn_inv_freq(self.dims, args.compress_rope_theta, scaling)
        else:
            inv_freq = yarn_inv_freq(self.dims, args.rope_theta, None)
        self.dim_freq = mx.repeat(inv_freq, 2)  # [dims]: each pair's frequency for both of its dims

    def __call__(self, x: mx.array, positions: mx.array, inverse: bool = False) -> mx.array:
        """x: [..., L, (heads,) D]; positions: [L] absolute positions of the L axis.

        `heads` is present when x has 4 dims ([B, L, H, D]); the rotation is the same for all. One kernel
        launch on a GPU (custom_kernels/rope.py).
        """
        return rope_kernel.rotate(x, positions, self.dim_freq, inverse,
                                  lambda: _rotate(x, positions, self.dim_freq, _SIN_SIGN[inverse]))


# pair (re, im) -> (re cos - im sin, im cos + re sin), computed per dim as v cos + swapped(v) (sign sin)
# with swapped(v) = (im, re) and sign = (-1, +1); the inverse rotation flips the sign
_SIN_SIGN = {False: mx.array([-1.0, 1.0]), True: mx.array([1.0, -1.0])}


@fused_for_decode
def _rotate(x: mx.array, positions: mx.array, dim_freq: mx.array, sin_sign: mx.array) -> mx.array:
    dims = dim_freq.shape[0]
    angles = positions.astype(mx.float32)[:, None] * dim_freq  # [L, dims]
    cos, sin = mx.cos(angles), (mx.sin(angles).reshape(-1, dims // 2, 2) * sin_sign).reshape(-1, dims)
    if x.ndim == 4:
        cos, sin = cos[:, None], sin[:, None]
    nope, rot = x[..., :-dims], x[..., -dims:].astype(mx.float32)
    swapped = rot.reshape(*rot.shape[:-1], dims // 2, 2)[..., ::-1].reshape(rot.shape)
    return mx.concatenate([nope, (rot * cos + swapped * sin).astype(x.dtype)], axis=-1)
