"""The kernels that replace chains of small MLX ops in a decode step: RoPE, RMSNorm and the fp32 row products
(custom_kernels/rope.py, norm.py, row_product.py) against their pure-MLX references (layers/rope.py,
layers/numerics.py, the gate's and the compressor's fp32 products) and an exact float64 computation: emulated on
the CPU (both flavours compiled) and on the GPU."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_emulator import emulate, record_launches, references_for

from ds4_mlx.config import ModelArgs
from ds4_mlx.custom_kernels import backend, route, row_product
from ds4_mlx.custom_kernels import rope as rope_kernels
from ds4_mlx.layers import numerics, rope
from ds4_mlx.layers.attention import head_rms_norm
from ds4_mlx.layers.moe import Gate
from ds4_mlx.layers.numerics import RMSNorm

ARGS = ModelArgs(num_hidden_layers=1, compress_ratios=[0, 0], rope_scaling={  # Flash's YaRN
    "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1})
MANTISSA = {mx.bfloat16: 7, mx.float16: 10, mx.float32: 23}


def on_cpu(fn):
    """fn() evaluated on the CPU (the GPU tests' reference)."""
    with mx.stream(mx.cpu):
        out = fn()
        mx.eval(out)
    return out


def assert_near_exact(ours, reference, exact, ulps, flips, magnitude=0.0):
    """ours and the reference within `ulps` units in the last place of their dtype of the float64 `exact` (plus
    what fp32 arithmetic can lose where terms of absolute sum `magnitude` cancel); ours differs from the
    reference in at most a fraction `flips` of the elements."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 2.0**-100))) - MANTISSA[ours.dtype])
    allowed = ulps * ulp + 2.0**-21 * magnitude
    for out in (ours, reference):
        error = np.abs(np.array(out.astype(mx.float32)).astype(np.float64) - exact)
        assert (error <= allowed).all(), (error / allowed).max()
    differ = np.array(ours.astype(mx.float32)) != np.array(reference.astype(mx.float32))
    assert differ.mean() <= flips, differ.mean()


def exact_rope(x, positions, dim_freq, inverse):
    """float64 rotation of the last len(dim_freq) dims (angles from the fp32 frequencies, as the kernel), and the
    absolute sum of each output's two terms."""
    x = np.array(x.astype(mx.float32)).astype(np.float64)
    dims = dim_freq.shape[0]
    angles = (np.array(positions, np.float32)[:, None] * np.array(dim_freq)[None, ::2]).astype(np.float64)
    if x.ndim == 4:
        angles = angles[:, None]
    cos, sin = np.cos(angles), np.sin(angles) * (-1 if inverse else 1)
    re, im = x[..., -dims::2], x[..., -dims + 1::2]
    out, magnitude = x.copy(), np.zeros_like(x)
    out[..., -dims::2] = re * cos - im * sin
    out[..., -dims + 1::2] = im * cos + re * sin
    magnitude[..., -dims::2] = np.abs(re * cos) + np.abs(im * sin)
    magnitude[..., -dims + 1::2] = np.abs(im * cos) + np.abs(re * sin)
    return out, magnitude


ROPE_CASES = [  # (name, shape, dtype, compressed, inverse, first position)
    ("heads-bf16", (1, 3, 4, 128), mx.bfloat16, True, False, 70_000),
    ("heads-inverse", (2, 2, 3, 128), mx.bfloat16, False, True, 5),
    ("rows-fp32", (2, 5, 96), mx.float32, True, False, 1_000_000),
    ("rows-fp16", (1, 6, 64), mx.float16, False, False, 0),
]


def rope_case(case):
    name, shape, dtype, compressed, inverse, first = case
    module = rope.RoPE(ARGS, compressed=compressed)
    rng = np.random.default_rng(ROPE_CASES.index(case))
    x = mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)
    length = shape[1]
    positions = mx.arange(first, first + length)
    return module, x, positions, inverse


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_rope_emulated(monkeypatch, case):
    module, x, positions, inverse = rope_case(case)
    reference = rope._rotate(x, positions, module.dim_freq, rope._SIN_SIGN[inverse])
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    ours = module(x, positions, inverse=inverse)
    assert launched == ["rope"]
    dims = module.dims
    np.testing.assert_array_equal(np.array(ours[..., :-dims].astype(mx.float32)),
                                  np.array(x[..., :-dims].astype(mx.float32)))  # the other dims copied
    ulps = 4 if x.dtype == mx.float32 else 1  # fp32: cos and sin of large angles, each within an ulp or two
    exact, magnitude = exact_rope(x, positions, module.dim_freq, inverse)
    assert_near_exact(ours, reference, exact, ulps, 1.0 if x.dtype == mx.float32 else 0.02, magnitude)


def test_rope_where_the_kernel_does_not_apply(monkeypatch):
    """Thread counts (one per pair) that are not whole SIMD groups: 3 pairs, 5 rows of 36 pairs: the reference."""
    module = rope.RoPE(ARGS, compressed=True)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    x = mx.ones((1, 1, 6), mx.bfloat16)
    small = rope.RoPE.__new__(rope.RoPE)
    small.dims, small.dim_freq = 4, module.dim_freq[:4]
    small(x, mx.array([3]))
    x = mx.ones((1, 5, 72), mx.float32)
    reference = rope._rotate(x, mx.arange(5), module.dim_freq, rope._SIN_SIGN[False])
    assert mx.array_equal(module(x, mx.arange(5)), reference)
    assert launched == []


NORM_CASES = [  # (name, shape, dtype, weight dtype)
    ("hidden-bf16", (3, 4096), mx.bfloat16, mx.bfloat16),
    ("head-fp16", (2, 5, 512), mx.float16, mx.float32),
    ("indexer-fp32", (7, 128), mx.float32, mx.bfloat16),
    ("odd-width", (4, 96), mx.bfloat16, mx.bfloat16),
]


def norm_case(case):
    name, shape, dtype, weight_dtype = case
    rng = np.random.default_rng(10 + NORM_CASES.index(case))
    norm = RMSNorm(shape[-1], eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.2, 2.0, shape[-1]).astype(np.float32)).astype(weight_dtype)
    scale = np.exp2(rng.integers(-8, 8, size=(*shape[:-1], 1)))  # rows of different magnitudes
    x = mx.array((rng.normal(size=shape) * scale).astype(np.float32)).astype(dtype)
    return norm, x


def exact_norm(norm, x):
    x64 = np.array(x.astype(mx.float32)).astype(np.float64)
    w64 = np.array(norm.weight.astype(mx.float32)).astype(np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + norm.eps) * w64


@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_rms_norm_emulated(monkeypatch, case):
    norm, x = norm_case(case)
    reference = norm.reference(x)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    ours = norm(x)
    assert launched == ["rms_norm"]
    assert_near_exact(ours, reference, exact_norm(norm, x), 8 if x.dtype == mx.float32 else 1,
                      1.0 if x.dtype == mx.float32 else 0.02)


def test_rms_norm_where_the_kernel_does_not_apply(monkeypatch):
    """Rows that are not a multiple of 32 wide, wider than 16 x 256, or integer: the reference."""
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    for width in (100, 8192):
        norm = RMSNorm(width)
        x = mx.ones((2, width), mx.bfloat16)
        assert mx.array_equal(norm(x), norm.reference(x)).item()
    assert launched == []


PRODUCT_CASES = [  # (name, x shape, x dtype, weight shape, weight dtype, pair)
    ("gate-bf16", (1, 1, 256), mx.bfloat16, (64, 256), mx.bfloat16, False),
    ("gate-fp32-rows", (3, 160), mx.float32, (32, 160), mx.float32, False),
    ("compressor-bf16", (1, 1, 256), mx.bfloat16, (96, 256), mx.bfloat16, True),
    ("compressor-batch", (2, 1, 128), mx.float16, (48, 128), mx.bfloat16, True),
]


def product_case(case):
    name, shape, dtype, w_shape, w_dtype, is_pair = case
    rng = np.random.default_rng(20 + PRODUCT_CASES.index(case))
    x = mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)
    weights = [mx.array(rng.normal(size=w_shape).astype(np.float32) / 16).astype(w_dtype) for _ in range(2)]
    bias = mx.array(rng.normal(size=(*shape[:-1], w_shape[0])).astype(np.float32))
    x32, w32 = x.astype(mx.float32), [w.astype(mx.float32) for w in weights]

    def reference():
        return (x32 @ w32[0].T, x32 @ w32[1].T + bias) if is_pair else x32 @ w32[0].T

    def ours():
        if is_pair:
            return row_product.pair(x, weights[0], weights[1], bias, reference)
        return row_product.single(x, weights[0], reference)

    x64 = np.array(x32).astype(np.float64)
    exact = [x64 @ np.array(w).astype(np.float64).T for w in w32]
    magnitude = [np.abs(x64) @ np.abs(np.array(w).astype(np.float64)).T for w in w32]
    if is_pair:
        exact[1] = exact[1] + np.array(bias)
        magnitude[1] = magnitude[1] + np.abs(np.array(bias))
    return ours, reference, exact[:1 + is_pair], magnitude[:1 + is_pair]


def assert_products(ours, reference, exact, magnitude):
    """fp32 sums of the same exact products in another order: within 2^-20 of the terms' absolute sum."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    reference = reference if isinstance(reference, tuple) else (reference,)
    for y, ref, e, m in zip(ours, reference, exact, magnitude):
        assert y.dtype == mx.float32 and y.shape == ref.shape
        for out in (y, ref):
            assert (np.abs(np.array(out).astype(np.float64) - e) <= 2.0**-20 * m).all()


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=[c[0] for c in PRODUCT_CASES])
def test_row_product_emulated(monkeypatch, case):
    ours, reference, exact, magnitude = product_case(case)
    expected = reference()
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    assert_products(ours(), expected, exact, magnitude)
    assert launched == ["row_product_pair" if case[-1] else "row_product"]


def test_row_product_where_the_kernel_does_not_apply(monkeypatch):
    """More than MAX_ROWS rows, quantized (integer) weights, a bias of another shape: the reference."""
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    x = mx.ones((row_product.MAX_ROWS + 1, 64), mx.bfloat16)
    w = mx.ones((32, 64), mx.bfloat16)
    assert row_product.single(x, w, lambda: x.astype(mx.float32) @ w.T.astype(mx.float32)).shape == (9, 32)
    assert row_product.single(x[:1], w.astype(mx.uint32), lambda: mx.zeros((1, 32))).shape == (1, 32)
    row_product.pair(x[:1], w, w, mx.zeros((32,)), lambda: (mx.zeros((1, 32)), mx.zeros((1, 32))))
    assert launched == []


@pytest.mark.gpu
@pytest.mark.parametrize("case", PRODUCT_CASES, ids=[c[0] for c in PRODUCT_CASES])
def test_gpu_row_product(case):
    assert backend.backend() is not None, "no GPU kernel backend"
    ours, reference, exact, magnitude = product_case(case)
    expected = on_cpu(reference)
    assert_products(ours(), expected, exact, magnitude)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROPE_CASES + NORM_CASES, ids=[c[0] for c in ROPE_CASES + NORM_CASES])
def test_gpu_against_cpu_reference(case):
    assert backend.backend() is not None, "no GPU kernel backend"
    if case in ROPE_CASES:
        module, x, positions, inverse = rope_case(case)
        ours = module(x, positions, inverse=inverse)
        exact, magnitude = exact_rope(x, positions, module.dim_freq, inverse)
        reference = on_cpu(lambda: rope._rotate(x, positions, module.dim_freq, rope._SIN_SIGN[inverse]))
        ulps = 4 if x.dtype == mx.float32 else 1
    else:
        norm, x = norm_case(case)
        ours = norm(x)
        exact, magnitude = exact_norm(norm, x), 0.0
        reference = on_cpu(lambda: norm.reference(x))
        ulps = 8 if x.dtype == mx.float32 else 1
    mx.eval(ours, reference)
    assert_near_exact(ours, reference, exact, ulps, 1.0 if x.dtype == mx.float32 else 0.02, magnitude)


def test_emulated_small_model_with_the_decode_ops(small_native, monkeypatch):
    """The SMALL model (fp32) prefilling 24 tokens then decoding 10 one by one (CSA windows complete on every fourth
    token) with these kernels emulated and every other kernel on its reference: the logits of the pure-MLX path
    within fp32 noise, and every kernel of this file launched from the model's own call sites (the layers' norms
    and RoPE, the queries' head norm and RoPE, the KV rows, the MoE gate and its top-k, the compressors)."""
    from conftest import SMALL, load_fp32, random_ids, run_chunks

    model = load_fp32(small_native)
    ids = random_ids(34, SMALL["vocab_size"], seed=5)
    off = run_chunks(model, ids, [24])
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    ours = {"rope", "head_norm_rope", "rms_norm", "rms_norm_rope", "row_product", "row_product_pair", "route_top_k"}
    references_for(monkeypatch, lambda name: name not in ours)
    on = run_chunks(model, ids, [24])
    assert set(launched) == ours
    np.testing.assert_allclose(on, off, rtol=0, atol=1e-4 * np.abs(off).max())


HEAD_CASES = [  # (name, shape, dtype, first position)
    ("flash-heads", (1, 2, 8, 512), mx.bfloat16, 4096),
    ("batch-fp16", (2, 3, 2, 128), mx.float16, 7),
    ("fp32", (1, 1, 4, 64), mx.float32, 100_000),
]


def head_case(case):
    name, shape, dtype, first = case
    rng = np.random.default_rng(30 + HEAD_CASES.index(case))
    scale = np.exp2(rng.integers(-6, 6, size=(*shape[:-1], 1)))  # head rows of different magnitudes
    x = mx.array((rng.normal(size=shape) * scale).astype(np.float32)).astype(dtype)
    module = rope.RoPE(ARGS, compressed=True)
    positions = mx.arange(first, first + shape[1])

    def reference():
        return module(head_rms_norm(x, 1e-6), positions)

    return x, positions, module, reference


def assert_head_rows(ours, reference, x):
    """Within two ulps of x's dtype of the reference, plus, in the rotated pairs, two ulps of the pair's magnitude:
    the head norm's scale may round the other way after an fp32 sum in another order, which moves a whole row by
    an ulp before the rotation mixes each pair (a difference of nearly equal terms keeps that absolute error)."""
    mantissa = MANTISSA[ours.dtype]
    a, b = np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32))
    normed = np.abs(np.array(head_rms_norm(x, 1e-6).astype(mx.float32)))
    pairs = np.repeat(normed[..., ::2] + normed[..., 1::2], 2, axis=-1)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b), 2.0**-100))) - mantissa)
    allowed = 2 * ulp + 2.0 ** (1 - mantissa) * pairs
    assert (np.abs(a - b) <= allowed).all(), (np.abs(a - b) / allowed).max()
    if ours.dtype != mx.float32:  # (fp32: the cosines and sines differ in the last bit everywhere)
        differ = (a != b).any(axis=-1).mean()
        assert differ <= 0.35, differ  # rows the scale moved


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_head_norm_rope_emulated(monkeypatch, case):
    x, positions, module, reference = head_case(case)
    expected = reference()
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    ours = rope_kernels.head_norm_rotate(x, positions, module.dim_freq, 1e-6, reference)
    assert launched == ["head_norm_rope"]
    assert_head_rows(ours, expected, x)


@pytest.mark.gpu
@pytest.mark.parametrize("case", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_gpu_head_norm_rope(case):
    assert backend.backend() is not None, "no GPU kernel backend"
    x, positions, module, reference = head_case(case)
    ours = rope_kernels.head_norm_rotate(x, positions, module.dim_freq, 1e-6, reference)
    expected = on_cpu(reference)
    assert_head_rows(ours, expected, x)


KV_CASES = [  # (name, shape, dtype, FP8 KV)
    ("flash-kv-fp8", (1, 3, 512), mx.bfloat16, True),
    ("batch-fp16", (2, 2, 128), mx.float16, False),
    ("fp32-fp8", (1, 2, 512), mx.float32, True),
]


def kv_case(case):
    name, shape, dtype, fp8 = case
    rng = np.random.default_rng(40 + KV_CASES.index(case))
    norm = RMSNorm(shape[-1], eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.2, 2.0, shape[-1]).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array((rng.normal(size=shape) * np.exp2(rng.integers(-6, 6, size=(*shape[:-1], 1)))).astype(np.float32))
    module = rope.RoPE(ARGS, compressed=True)
    return norm, module, x.astype(dtype), mx.arange(900, 900 + shape[1]), fp8


@pytest.mark.parametrize("case", KV_CASES, ids=[c[0] for c in KV_CASES])
def test_kv_rows_emulated(monkeypatch, case):
    """The KV rows' norm, RoPE and FP8 round trip in one launch (custom_kernels/norm.py, rms_norm_rope) against
    numerics.kv_rows' reference: equal but where the norm's fp32 sum (another order) rounds a value the other way,
    which the RoPE can carry into a pair and the FP8 grid can widen to one e4m3 step."""
    norm, module, x, positions, fp8 = kv_case(case)
    expected = numerics.kv_rows(norm, module, x, positions, fp8)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    ours = numerics.kv_rows(norm, module, x, positions, fp8)
    assert launched == ["rms_norm_rope"]
    assert_kv_rows(ours, expected)


def assert_kv_rows(ours, expected):
    a, b = np.array(ours.astype(mx.float32)), np.array(expected.astype(mx.float32))
    mantissa = MANTISSA[ours.dtype]
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b), 2.0**-100))) - mantissa)
    pairs = np.repeat(np.abs(b[..., ::2]) + np.abs(b[..., 1::2]), 2, axis=-1)
    allowed = 2 * ulp + 2.0 ** (1 - mantissa) * pairs + 2.0**-3 * np.maximum(np.abs(a), np.abs(b))
    assert (np.abs(a - b) <= allowed).all(), (np.abs(a - b) / allowed).max()
    if ours.dtype != mx.float32:
        assert (a != b).mean() <= 0.03, (a != b).mean()


def test_kv_rows_where_the_kernel_does_not_apply(monkeypatch):
    """Rows of 50 pairs (not a multiple of 32 threads): the reference."""
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    module = rope.RoPE(ARGS, compressed=True)
    numerics.kv_rows(RMSNorm(100), module, mx.ones((1, 2, 100), mx.bfloat16), mx.arange(2), False)
    assert launched.count("rms_norm_rope") == 0


@pytest.mark.gpu
@pytest.mark.parametrize("case", KV_CASES, ids=[c[0] for c in KV_CASES])
def test_gpu_kv_rows(case):
    assert backend.backend() is not None, "no GPU kernel backend"
    norm, module, x, positions, fp8 = kv_case(case)
    ours = numerics.kv_rows(norm, module, x, positions, fp8)
    backend.set_enabled(False)
    try:
        expected = on_cpu(lambda: numerics.kv_rows(norm, module, x, positions, fp8))
    finally:
        backend.set_enabled(True)
    assert_kv_rows(ours, expected)


ROUTE_CASES = [  # (name, rows, experts, k, ties)
    ("flash", 1, 256, 6, False),
    ("rows-odd-experts", 3, 72, 6, False),
    ("ties", 2, 64, 3, True),
]


def route_case(case):
    name, rows, experts, k, ties = case
    rng = np.random.default_rng(50 + ROUTE_CASES.index(case))
    logits = rng.normal(size=(rows, experts)).astype(np.float32) * 3
    if ties:  # exact ties among the largest (equal logits and equal bias)
        logits[:, 1::2] = logits[:, 0::2]
    bias = np.zeros(experts, np.float32) if ties else (rng.normal(size=experts) * 0.1).astype(np.float32)
    gate = Gate.__new__(Gate)
    nn.Module.__init__(gate)
    gate.top_k, gate.route_scale, gate.bias = k, 2.5, mx.array(bias)
    return gate, mx.array(logits)


def assert_routes(ours, reference, gate, logits):
    """The same picks (up to order; under exact ties: picks of the same biased values) and their weights to fp32
    rounding."""
    (w, i), (w_ref, i_ref) = [tuple(np.array(a) for a in pair) for pair in (ours, reference)]
    assert i.dtype == np.int32 and w.shape == w_ref.shape == i.shape == i_ref.shape
    biased = np.sqrt(np.logaddexp(np.array(logits, np.float64), 0.0)) + np.array(gate.bias)
    for row in range(i.shape[0]):
        np.testing.assert_array_equal(np.sort(biased[row, i[row]]), np.sort(biased[row, i_ref[row]]))
        assert len(set(i[row].tolist())) == i.shape[1]
        np.testing.assert_allclose(np.sort(w[row]), np.sort(w_ref[row]), rtol=1e-6)


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_route_emulated(monkeypatch, case):
    gate, logits = route_case(case)
    expected = gate._top_k(logits)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    ours = route.top_k(logits, gate.bias, gate.top_k, gate.route_scale, lambda: gate._top_k(logits))
    assert launched == ["route_top_k"]
    assert_routes(ours, expected, gate, logits)
    if case[-1]:  # experts 2j and 2j + 1 tie: where only one of them is picked, the lower index
        for picks in np.array(ours[1]).tolist():
            assert all(p % 2 == 0 for p in picks if p ^ 1 not in picks), picks


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_gpu_route(case):
    assert backend.backend() is not None, "no GPU kernel backend"
    gate, logits = route_case(case)
    ours = route.top_k(logits, gate.bias, gate.top_k, gate.route_scale, lambda: gate._top_k(logits))
    assert_routes(ours, on_cpu(lambda: gate._top_k(logits)), gate, logits)
