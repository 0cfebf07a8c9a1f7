"""The low-precision simulations and RoPE against independent references (torch, formulas)."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from ds4_mlx.config import ModelArgs
from ds4_mlx.layers.numerics import fp4_round_trip, fp8_round_trip, hadamard_matrix, hadamard_rotate
from ds4_mlx.layers.rope import RoPE, yarn_inv_freq

E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def _heavy_tailed(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * np.exp(rng.standard_normal((rows, 1)) * 3)
    x[0, :6] = [0.0, 1e-9, -1e-9, 3e-5, 0.0, -0.0]
    return x.astype(np.float32)


def _pow2_scale(blocks, fmt_max, floor):
    amax = np.maximum(np.abs(blocks).max(-1, keepdims=True), floor).astype(np.float32)
    return np.exp2(np.ceil(np.log2(amax * np.float32(1 / fmt_max))))


@pytest.mark.parametrize("block", [64, 128])
def test_fp8_round_trip_matches_torch_e4m3(block):
    x = _heavy_tailed(64, 256)
    blocks = torch.tensor(x).view(64, -1, block)
    scale = torch.tensor(_pow2_scale(blocks.numpy(), 448.0, 1e-4))
    want = ((blocks / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).view(64, 256)
    got = np.array(fp8_round_trip(mx.array(x), block))
    np.testing.assert_array_equal(got, want.numpy())


def test_fp4_round_trip_is_nearest_even_on_the_e2m1_grid():
    x = _heavy_tailed(64, 128)
    blocks = x.reshape(64, -1, 32).astype(np.float64)
    scale = _pow2_scale(blocks, 6.0, 6.0 * 2.0**-126)
    y = np.clip(blocks / scale, -6, 6)
    distance = np.abs(np.abs(y)[..., None] - E2M1_GRID)
    nearest = distance.min(-1, keepdims=True)
    candidates = np.isclose(distance, nearest, rtol=0, atol=1e-12)
    even_mantissa = np.array([True, False, True, False, True, False, True, False])  # 0, 1, 2, 4 are even codes
    tie = candidates.sum(-1) > 1
    index = np.where(tie, np.argmax(candidates & even_mantissa, -1), np.argmax(candidates, -1))
    want = (np.sign(y) * E2M1_GRID[index] * scale).reshape(64, 128)
    got = np.array(fp4_round_trip(mx.array(x), 32))
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_round_trips_keep_dtype_and_fixed_points():
    x = mx.array([[1.0, -2.0, 0.5, 448.0] * 16], dtype=mx.bfloat16)
    assert fp8_round_trip(x, 64).dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(fp8_round_trip(x, 64).astype(mx.float32)), np.array(x.astype(mx.float32)))


def test_hadamard_is_orthonormal_sylvester():
    h = np.array(hadamard_matrix(128))
    np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
    sylvester = np.array([[1.0]])
    while sylvester.shape[0] < 128:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    np.testing.assert_allclose(h, sylvester / math.sqrt(128), atol=1e-7)
    x = mx.random.normal((3, 128))
    np.testing.assert_allclose(np.array(hadamard_rotate(hadamard_rotate(x))), np.array(x), atol=1e-5)


def test_yarn_frequencies_follow_the_official_blend():
    scaling = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
    got = np.array(yarn_inv_freq(64, 160000.0, scaling))
    base = 1.0 / 160000.0 ** (np.arange(0, 64, 2) / 64)
    # Flash: frequencies 0-15 unchanged, 16-24 blended, 25-31 divided by the factor (spec section 1).
    np.testing.assert_allclose(got[:15], base[:15], rtol=1e-6)
    np.testing.assert_allclose(got[25:], base[25:] / 16, rtol=1e-6)
    assert np.all((got[15:25] <= base[15:25]) & (got[15:25] >= base[15:25] / 16))
    np.testing.assert_allclose(np.array(yarn_inv_freq(64, 10000.0, None)), 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64), rtol=1e-6)


def test_rope_rotates_interleaved_pairs_of_the_trailing_dims_and_inverts():
    args = ModelArgs(compress_ratios=[0] * 44, head_dim=128, qk_rope_head_dim=64)
    rope = RoPE(args, compressed=False)
    x = mx.random.normal((1, 5, 2, 128))
    positions = mx.arange(7, 12)
    y = rope(x, positions)
    np.testing.assert_array_equal(np.array(y[..., :64]), np.array(x[..., :64]))
    # complex multiply by exp(i * position * inv_freq) on pairs (2i, 2i+1)
    z = np.array(x[..., 64:]).reshape(1, 5, 2, 32, 2)
    angle = np.arange(7, 12)[:, None, None] * np.array(yarn_inv_freq(64, args.rope_theta, None))
    want = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * angle)
    want = np.stack([want.real, want.imag], -1).reshape(1, 5, 2, 64)
    np.testing.assert_allclose(np.array(y[..., 64:]), want, atol=1e-5)
    np.testing.assert_allclose(np.array(rope(y, positions, inverse=True)), np.array(x), atol=1e-5)


def _grid_round(y: mx.array, mantissa_bits: int, min_exponent: int) -> np.ndarray:
    """Round to the nearest value with `mantissa_bits` explicit mantissa bits and no exponent below
    `min_exponent` (subnormals), ties to even; in float64, where every step is exact."""
    y = np.array(y).astype(np.float64)
    exponent = np.maximum(np.frexp(y)[1] - 1, min_exponent)  # floor(log2 |y|), clamped
    quantum = np.ldexp(1.0, exponent - mantissa_bits)
    return (np.round(y / quantum) * quantum).astype(np.float32)


def _grid_and_midpoints(values: np.ndarray, limit: float) -> mx.array:
    """A format's values, the midpoints between neighbours and the floats next to each midpoint."""
    values = np.unique(values[np.isfinite(values)])
    mids = (values[:-1] + values[1:]) / 2
    x = np.concatenate([values, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]).astype(np.float32)
    return mx.array(x[np.abs(x) <= limit])


def test_fp8_and_fp4_rounding_equal_the_grid_rounding():
    """The round trips round with MLX's e4m3 conversion and a select-based e2m1 rounding: both equal
    rounding to the format's grid (mantissa bits, smallest exponent, ties to even; numpy float64) at
    every value, midpoint and float next to a midpoint."""
    from ds4_mlx.layers.numerics import _e2m1, _e4m3

    e4m3 = _grid_and_midpoints(np.array(mx.from_fp8(mx.arange(256).astype(mx.uint8), mx.float32)), 448)
    np.testing.assert_array_equal(np.array(_e4m3(e4m3)), _grid_round(e4m3, 3, -6))
    magnitudes = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    e2m1 = _grid_and_midpoints(np.concatenate([magnitudes, -magnitudes]), 6)
    np.testing.assert_array_equal(np.array(_e2m1(e2m1)), _grid_round(e2m1, 1, 0))
