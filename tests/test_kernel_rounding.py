"""The block round-trip kernel (custom_kernels/rounding.py) against the pure-MLX round trips of
layers/numerics.py: bit for bit, emulated on the CPU (both flavours compiled) and on the GPU."""

import mlx.core as mx
import numpy as np
import pytest
from kernel_emulator import emulate, record_launches

from ds4_mlx.custom_kernels import backend
from ds4_mlx.layers import numerics


def values(shape, seed, dtype):
    """Random values over many binades, a block of zeros, tiny values (the amax floor) and exact grid
    midpoints: a block whose amax sets the scale to 1 (448 for e4m3, 6 for e2m1) holding midpoints."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * np.exp2(rng.integers(-12, 12, size=shape))
    flat = x.reshape(-1, shape[-1])
    flat[0, :32] = 0.0
    flat[0, 32:64] = rng.normal(size=32) * 1e-7
    e4m3 = np.array(mx.from_fp8(mx.arange(127).astype(mx.uint8), mx.float32))
    midpoints = (e4m3[1:] + e4m3[:-1]) / 2
    if shape[-1] >= 128:
        flat[-1, :64] = np.concatenate([[448.0], midpoints[-63:]])
        flat[-1, 64:96] = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0] + [0.0] * 21
    return mx.array(x.astype(np.float32)).astype(dtype)


def assert_bitwise(ours, reference):
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32)))


CASES = [  # (name, shape, dtype, call)
    ("fp8-128-bf16", (3, 5, 256), mx.bfloat16, lambda x: numerics.fp8_round_trip(x, 128)),
    ("fp8-64-fp32", (7, 192), mx.float32, lambda x: numerics.fp8_round_trip(x, 64)),
    ("fp8-128-fp16", (2, 128), mx.float16, lambda x: numerics.fp8_round_trip(x, 128)),
    ("fp4-32-fp32", (4, 3, 128), mx.float32, lambda x: numerics.fp4_round_trip(x, 32)),
    ("fp4-32-bf16", (9, 64), mx.bfloat16, lambda x: numerics.fp4_round_trip(x, 32)),
    ("fp8-kv", (1, 6, 512), mx.bfloat16, lambda x: numerics.fp8_kv(x, 64)),
    ("fp8-kv-fp32", (2, 3, 192), mx.float32, lambda x: numerics.fp8_kv(x, 64)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference(monkeypatch, case):
    _, shape, dtype, call = case
    x = values(shape, CASES.index(case), dtype)
    reference = call(x)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    assert_bitwise(call(x), reference)
    assert launched == ["block_round_trip"]


def test_where_the_kernel_does_not_apply(monkeypatch):
    """Blocks that are not whole warps (16) and integer inputs run the reference."""
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    x = values((2, 64), 1, mx.float32)
    assert_bitwise(numerics.fp4_round_trip(x, 16), numerics._block_round_trip(x, 16, *numerics.FORMATS["e2m1"],
                                                                            "e2m1"))
    assert launched == []


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_equals_cpu_reference(case):
    _, shape, dtype, call = case
    assert backend.backend() is not None, "no GPU kernel backend"
    x = values((512, *shape[1:]) if len(shape) == 2 else shape, 3, dtype)
    ours = call(x)
    backend.set_enabled(False)
    try:
        with mx.stream(mx.cpu):
            reference = call(x)
            mx.eval(reference)
    finally:
        backend.set_enabled(True)
    assert_bitwise(ours, reference)
