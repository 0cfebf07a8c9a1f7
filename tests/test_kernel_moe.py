"""Routed-expert decode kernels (custom_kernels/moe.py) against the pure-MLX reference.

The kernels round where the reference rounds: the gate and up products (fp32 sums) to the
activation dtype, the route-weighted clamped SwiGLU (fp32) to the activation dtype, each
expert's down product (fp32 sum) to the activation dtype, and the k experts summed in fp32. Only
the order of the fp32 sums differs (the reference: MLX's quantized matmul; the kernels: per-lane
word sums, then a warp reduction), which moves a sum by ~1e-7 relative and so changes a rounded
value only where it lies that close to a rounding boundary, by one ulp. Hence, per stage:
- hidden: equal but for rare elements (<= 2% here; 5% at Flash shapes, against the reference
  run on the CPU, which rounds once as defined), each within what one ulp of gate, up and hidden
  can move it: ulp(h) + 2^-7 (2 + |gate|) |h| (silu's relative sensitivity is below 1 + |gate|).
- down, from the same hidden: within sum_k ulp(y_k) of the k per-expert outputs y_k (+ fp32 noise).
- end to end (hidden flips propagate through w2): relative L2 error below 2^-8 (one bf16 ulp).
The weights' decoding is checked bit-exactly against mx.dequantize.
"""

import copy
import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import kernel_weights
from kernel_emulator import emulate, record_launches

from ds4_mlx.custom_kernels import backend
from ds4_mlx.custom_kernels import moe as mk
from ds4_mlx.layers.linear import Linear, StackedLinear
from ds4_mlx.layers.moe import clamped_swiglu, routed_experts_reference
from ds4_mlx.layers.numerics import fp8_input

LIMIT = 10.0


# ---- helpers ----

def make_experts(experts, dim, inter, mode, bits, group_size, dtype=mx.bfloat16, seed=0):
    """w1, w2, w3 as the converter makes them: quantized from `dtype` weights (affine scales and
    biases in `dtype`), weights ~ N(0, 1/fan_in)."""
    key = mx.random.key(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(((dim, inter), (inter, dim), (dim, inter))):
        linear = StackedLinear(fan_in, fan_out, experts)
        linear.weight = (mx.random.normal((experts, fan_out, fan_in), key=mx.random.split(key, 3)[i])
                         * (1 / math.sqrt(fan_in))).astype(dtype)
        layers.append(linear.to_quantized(group_size, bits, mode))
        mx.eval(layers[-1].parameters())
    return layers


def make_inputs(n_tokens, k, experts, dim, dtype, seed, x_scale=8.0):
    """x (scaled so that |gate| and |up| often exceed the limit), route weights (sum 1.5) and
    distinct experts per token; tokens share some experts."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(experts, k, replace=False) for _ in range(n_tokens)]
    for n in range(1, n_tokens):  # repeat two of the previous token's experts
        shared = picks[n - 1][: min(2, k)]
        rest = [e for e in picks[n] if e not in shared]
        extra = [e for e in range(experts) if e not in shared and e not in rest]
        picks[n] = np.array((list(shared) + rest + extra)[:k])
        rng.shuffle(picks[n])
    weights = rng.uniform(0.2, 1.0, (n_tokens, k))
    weights = 1.5 * weights / weights.sum(-1, keepdims=True)
    x = rng.normal(0, x_scale, (n_tokens, dim))
    return (mx.array(x, dtype=mx.float32).astype(dtype), mx.array(weights, dtype=mx.float32),
            mx.array(np.stack(picks), dtype=mx.int32))


def reference_hidden(x, weights, indices, w1, w3):
    """(gate, up, hidden) [N * k, inter] token-major, through the reference's own ops."""
    n_tokens, k = indices.shape
    flat = indices.reshape(-1)
    rows = x[mx.arange(n_tokens * k) // k].reshape(n_tokens * k, 1, -1)
    g, u = w1(rows, flat), w3(rows, flat)
    h = (clamped_swiglu(g, u, LIMIT) * weights.reshape(-1)[:, None, None]).astype(x.dtype)
    return g[:, 0], u[:, 0], h[:, 0]


def reference_down(hidden, indices, w2):
    """Per-expert down products y [N, k, dim] (activation dtype) and their fp32 sum [N, dim]."""
    n_tokens, k = indices.shape
    y = w2(hidden.reshape(n_tokens * k, 1, -1), indices.reshape(-1)).reshape(n_tokens, k, -1)
    return y, mx.sum(y.astype(mx.float32), axis=1)


def f32(a):
    return np.array(a.astype(mx.float32))


def ulp(a, dtype):
    """One ulp of each value of a in `dtype` (bf16: 8 significant bits, fp16: 11, fp32: 24)."""
    bits = {mx.bfloat16: 8, mx.float16: 11, mx.float32: 24}[dtype]
    a = np.maximum(np.abs(a), 2.0**-126)
    return 2.0 ** (np.floor(np.log2(a)) - (bits - 1))


def assert_hidden_close(ours, g, u, h, dtype, flips):
    ours, g, h = f32(ours), f32(g), f32(h)
    diff = np.abs(ours - h)
    if dtype == mx.float32:  # nothing rounded: fp32 reordering noise
        np.testing.assert_allclose(ours, h, rtol=1e-5, atol=1e-5 * np.abs(h).max())
        return
    allowed = ulp(h, dtype) + 2.0**-7 * (2 + np.abs(g)) * np.abs(h) + 1e-30
    assert (diff <= allowed).all(), (diff / allowed).max()
    assert (diff > 0).mean() <= flips, (diff > 0).mean()


def assert_down_close(ours, y, dtype, flips):
    ours, y = np.array(ours), f32(y)
    diff = np.abs(ours - y.sum(1))
    if dtype == mx.float32:
        assert (diff <= 1e-5 * np.abs(y).sum(1)).all(), (diff / np.abs(y).sum(1)).max()
        return
    allowed = ulp(y, dtype).sum(1) * 1.0001 + 1e-6 * np.abs(y).sum(1)
    assert (diff <= allowed).all(), (diff / allowed).max()
    assert (diff > 1e-6 * np.abs(y).sum(1)).mean() <= flips, (diff > 0).mean()


def assert_end_to_end_close(ours, reference, relative=2.0**-8):
    ours, reference = np.array(ours), np.array(reference)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    assert np.linalg.norm(ours - reference) <= relative * np.linalg.norm(reference), (
        np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def check_all_stages(x, weights, indices, w1, w2, w3, flips, check_clamp=True, oracle=None):
    """Both kernels stage by stage, then the wrapper, against the reference (computed on the
    `oracle` device when given)."""
    fmts = mk.formats(x, weights, indices, w1, w2, w3)
    assert fmts is not None
    with mx.stream(oracle or mx.default_device()):
        g, u, h = reference_hidden(x, weights, indices, w1, w3)
        mx.eval(g, u, h)
    if check_clamp:  # the SwiGLU limit is active on both sides
        assert (f32(g) > LIMIT).any() and (f32(u) > LIMIT).any() and (f32(u) < -LIMIT).any()
    ours_h = mk.gate_up(x, weights, indices, w1, w3, fmts[0], LIMIT)
    assert ours_h is not None and ours_h.dtype == x.dtype and ours_h.shape == h.shape
    assert_hidden_close(ours_h, g, u, h, x.dtype, flips)
    with mx.stream(oracle or mx.default_device()):
        y, _ = reference_down(h, indices, w2)
        reference = routed_experts_reference(x, weights, indices, w1, w2, w3, LIMIT, False)
        mx.eval(y, reference)
    ours_out = mk.down(h, indices, w2, fmts[1])
    assert ours_out is not None
    assert_down_close(ours_out, y, x.dtype, flips)
    ours = mk.routed_experts(x, weights, indices, w1, w2, w3, LIMIT, False)
    assert_end_to_end_close(ours, reference)


@pytest.fixture
def launches(monkeypatch):
    return record_launches(monkeypatch)


@pytest.fixture
def emulated(monkeypatch):
    """Kernels run in the CPU emulator; returns the names of the kernels launched."""
    emulate(monkeypatch)
    return record_launches(monkeypatch)


# ---- decoding ----

def kernel_dequantize(wq, scales, biases, mode, bits, group_size):
    """The kernels' decoding, in numpy: affine codes through the float-bits trick (codes at
    bit p*bits of a half word, times 2^-(p*bits)); mxfp4 through the e2m1 table, mxfp8 from the e4m3 bits
    (the shared expert), both times their E8M0 scales."""
    q = np.array(wq).astype(np.uint32)
    if mode == "affine":
        per_word, half = 32 // bits, 16 // bits
        mask = np.uint32((1 << bits) - 1)
        codes = []
        for j in range(per_word):
            part = q & np.uint32(0xFFFF) if j < half else q >> np.uint32(16)
            p = j % half
            magic = (part & (mask << np.uint32(bits * p))) | np.uint32(0x4B000000)
            f = magic.view(np.float32) - np.float32(8388608.0)
            codes.append(f * np.float32(2.0 ** (-bits * p)))
        codes = np.stack(codes, -1).reshape(*q.shape[:-1], -1)
        s = np.repeat(f32(scales), group_size, -1)
        b = np.repeat(f32(biases), group_size, -1)
        return s * codes + b
    if mode == "mxfp8":  # e4m3 codes (byte j of a word is element j) from their bits
        b = np.stack([(q >> np.uint32(8 * j)) & np.uint32(255) for j in range(4)], -1).reshape(*q.shape[:-1], -1)
        e, m = (b >> np.uint32(3)) & np.uint32(15), b & np.uint32(7)
        normal = (((e + np.uint32(120)) << np.uint32(23)) | (m << np.uint32(20))).view(np.float32)
        magnitude = np.where(e > 0, normal, m.astype(np.float32) * np.float32(2.0**-9))
        codes = np.where(b & np.uint32(128), -magnitude, magnitude)
        e8 = np.array(scales).astype(np.uint32)
        scale = np.where(e8 == 0, np.float32(2.0**-127), (e8 << np.uint32(23)).view(np.float32))
        return codes * np.repeat(scale, 32, -1)
    table = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    codes = np.stack([table[(q >> np.uint32(4 * j)) & np.uint32(15)] for j in range(8)], -1).reshape(*q.shape[:-1], -1)
    e = np.array(scales).astype(np.uint32)
    scale = np.where(e == 0, np.float32(2.0**-127), (e << np.uint32(23)).view(np.float32))
    return codes * np.repeat(scale, 32, -1)


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 2, 32), ("affine", 2, 64), ("affine", 2, 128),
                                                  ("affine", 4, 32), ("affine", 4, 64), ("affine", 4, 128),
                                                  ("affine", 8, 64), ("mxfp4", 4, 32), ("mxfp8", 8, 32)])
def test_decoding_matches_mx_dequantize(mode, bits, group_size):
    """Scales 1e-8 (mxfp8: subnormal e4m3 codes in the blocks with small values) to 300."""
    w = mx.random.normal((4, 16, 256), key=mx.random.key(1)) * mx.array([1e-8, 0.01, 1.0, 300.0])[:, None, None]
    w = w * mx.exp(mx.random.normal(w.shape, key=mx.random.key(2)))  # values spread over many binades
    wq, scales, *biases = mx.quantize(w.astype(mx.bfloat16), group_size, bits, mode=mode)
    biases = biases[0] if biases else None
    fp32 = (lambda a: a.astype(mx.float32)) if mode == "affine" else (lambda a: a)
    expected = mx.dequantize(wq, fp32(scales), None if biases is None else fp32(biases), group_size=group_size,
                             bits=bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(kernel_dequantize(wq, scales, biases, mode, bits, group_size), np.array(expected))


# ---- emulated kernels vs reference ----

# (mode, bits, group size, dim, inter, tokens, k, activation dtype); experts = 8
CASES = [
    ("affine", 4, 32, 128, 64, 3, 2, mx.bfloat16),
    ("affine", 4, 128, 128, 128, 2, 3, mx.bfloat16),
    ("affine", 2, 32, 128, 64, 2, 6, mx.bfloat16),
    ("affine", 2, 64, 128, 64, 1, 4, mx.bfloat16),
    ("affine", 2, 128, 128, 128, 1, 5, mx.bfloat16),
    ("mxfp4", 4, 32, 128, 64, 2, 6, mx.bfloat16),
    ("mxfp4", 4, 32, 96, 64, 1, 3, mx.float32),  # fp32 activations (staged unpacked); 12 words per row
    ("affine", 8, 64, 128, 64, 3, 2, mx.float16),
]


@pytest.fixture
def small_geometry(monkeypatch):
    """Fewer warps per group: the emulator's cost grows with threads; the kernel logic is the same."""
    monkeypatch.setattr(mk, "GATE_UP_WARPS", 2)
    monkeypatch.setattr(mk, "DOWN_WARPS", 2)


def _case_id(c):
    return f"{c[0]}-{c[1]}bit-g{c[2]}-{c[3]}x{c[4]}-n{c[5]}-k{c[6]}-{str(c[7]).split('.')[-1]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_emulated_against_reference(small_geometry, emulated, case):
    mode, bits, group_size, dim, inter, n_tokens, k, dtype = case
    w1, w2, w3 = make_experts(8, dim, inter, mode, bits, group_size, dtype=dtype, seed=n_tokens + k)
    x, weights, indices = make_inputs(n_tokens, k, 8, dim, dtype, seed=k)
    check_all_stages(x, weights, indices, w1, w2, w3, flips=0.02)
    assert emulated == [f"moe_gate_up_{mode}", f"moe_down_{mode}"] * 2


def test_emulated_default_geometry_and_fp8_activations(emulated):
    """The Flash geometry (8 warps, 2 rows each) with 4-bit g64 weights, one token, k = 6; then
    FP8-simulated activations (the hidden round trip runs between the two kernels: custom_kernels/rounding.py)."""
    w1, w2, w3 = make_experts(8, 64, 128, "affine", 4, 64, seed=5)  # FP8 blocks: inter a multiple of 128
    x, weights, indices = make_inputs(1, 6, 8, 64, mx.bfloat16, seed=6)
    check_all_stages(x, weights, indices, w1, w2, w3, flips=0.02)
    ours = mk.routed_experts(x, weights, indices, w1, w2, w3, LIMIT, True)
    assert_end_to_end_close(ours, routed_experts_reference(x, weights, indices, w1, w2, w3, LIMIT, True))
    assert [n for n in emulated if n != "block_round_trip"] == ["moe_gate_up_affine", "moe_down_affine"] * 3
    assert emulated.count("block_round_trip") == 2  # between the two kernels, and in the reference


def test_emulated_without_limit(small_geometry, emulated):
    """swiglu_limit 0: no clamp."""
    w1, w2, w3 = make_experts(8, 64, 64, "affine", 4, 32, seed=7)
    x, weights, indices = make_inputs(2, 2, 8, 64, mx.bfloat16, seed=8)
    ours = mk.routed_experts(x, weights, indices, w1, w2, w3, 0.0, False)
    assert_end_to_end_close(ours, routed_experts_reference(x, weights, indices, w1, w2, w3, 0.0, False))
    clamped = routed_experts_reference(x, weights, indices, w1, w2, w3, LIMIT, False)
    assert np.abs(np.array(ours) - np.array(clamped)).max() > 1


def test_reference_where_the_kernels_do_not_apply(emulated):
    """More than MAX_TOKENS tokens, unsupported quantization or unquantized weights: the
    reference, and no launch."""
    x, weights, indices = make_inputs(mk.MAX_TOKENS + 1, 2, 8, 64, mx.bfloat16, seed=9)
    cases = [(mk.MAX_TOKENS + 1, make_experts(8, 64, 64, "affine", 4, 32, seed=10))]
    cases += [(1, make_experts(8, 64, 64, *args, seed=10)) for args in (("affine", 3, 32), ("mxfp8", 8, 32),
                                                                        ("nvfp4", 4, 16))]
    cases += [(1, [StackedLinear(64, 64, 8) for _ in range(3)])]
    for n, (w1, w2, w3) in cases:
        ours = mk.routed_experts(x[:n], weights[:n], indices[:n], w1, w2, w3, LIMIT, False)
        reference = routed_experts_reference(x[:n], weights[:n], indices[:n], w1, w2, w3, LIMIT, False)
        np.testing.assert_array_equal(np.array(ours), np.array(reference))
    assert emulated == []


# ---- the shared expert (mxfp8) in the same launches ----

def make_shared(dim, inter, dtype=mx.bfloat16, seed=0):
    """The shared expert's w1, w2, w3 as the checkpoint's FP8 linears load: mxfp8, group 32."""
    key = mx.random.key(100 + seed)
    linears = []
    for i, (fan_in, fan_out) in enumerate(((dim, inter), (inter, dim), (dim, inter))):
        linear = Linear(fan_in, fan_out)
        linear.weight = (mx.random.normal((fan_out, fan_in), key=mx.random.split(key, 3)[i])
                         * (1 / math.sqrt(fan_in))).astype(dtype)
        linears.append(linear.to_quantized(32, 8, "mxfp8"))
        mx.eval(linears[-1].parameters())
    return SimpleNamespace(w1=linears[0], w2=linears[1], w3=linears[2])


def moe_reference(x, weights, indices, routed, shared, limit=LIMIT, fp8=False):
    """layers.moe.MoE's expert sum without the kernels: (routed (fp32) + shared) in x's dtype."""
    hidden = fp8_input(clamped_swiglu(shared.w1(x), shared.w3(x), limit).astype(x.dtype), fp8)
    routed_sum = routed_experts_reference(x, weights, indices, routed.w1, routed.w2, routed.w3, limit, fp8)
    return (routed_sum + shared.w2(hidden)).astype(x.dtype)


# (mode, bits, group size, dim, inter, tokens, k, activation dtype); experts = 8
SHARED_CASES = [
    ("affine", 2, 128, 128, 128, 1, 6, mx.bfloat16),
    ("affine", 4, 64, 128, 64, 2, 3, mx.bfloat16),
    ("mxfp4", 4, 32, 96, 64, 2, 2, mx.float32),  # fp32 activations; 24 mxfp8 words per w1 row
    ("affine", 8, 32, 64, 96, 3, 2, mx.float16),
]


@pytest.mark.parametrize("case", SHARED_CASES, ids=_case_id)
def test_emulated_with_the_shared_expert(small_geometry, emulated, case):
    """Stage by stage: gate/up's routed rows are the routed kernel's, bit for bit, and its shared rows are the
    shared expert's SwiGLU within hidden's ulp bound; the down output is (routed sum + shared) rounded once, within
    the ulps of the k + 1 rounded products and of the total; end to end against MoE's own expression."""
    mode, bits, group_size, dim, inter, n_tokens, k, dtype = case
    w1, w2, w3 = make_experts(8, dim, inter, mode, bits, group_size, dtype=dtype, seed=n_tokens + k)
    routed, shared = SimpleNamespace(w1=w1, w2=w2, w3=w3), make_shared(dim, inter, dtype, seed=k)
    x, weights, indices = make_inputs(n_tokens, k, 8, dim, dtype, seed=k)
    fmts = mk.formats(x, weights, indices, w1, w2, w3)
    assert mk.shared_applies(shared, dim, inter)
    ours_h = mk.gate_up(x, weights, indices, w1, w3, fmts[0], LIMIT, shared)
    assert ours_h.shape == (n_tokens * (k + 1), inter) and ours_h.dtype == dtype
    alone = mk.gate_up(x, weights, indices, w1, w3, fmts[0], LIMIT)
    np.testing.assert_array_equal(f32(ours_h[: n_tokens * k]), f32(alone))
    g, u = shared.w1(x), shared.w3(x)
    assert (f32(g) > LIMIT).any() and (f32(u) < -LIMIT).any()  # the clamp is active
    h = clamped_swiglu(g, u, LIMIT).astype(dtype)
    assert_hidden_close(ours_h[n_tokens * k :], g, u, h, dtype, flips=0.03)

    out = mk.down(ours_h, indices, w2, fmts[1], shared)
    assert out.shape == (n_tokens, dim) and out.dtype == dtype
    y, routed_sum = reference_down(ours_h[: n_tokens * k], indices, w2)
    y_shared = shared.w2(ours_h[n_tokens * k :])
    expected = f32((routed_sum + y_shared).astype(dtype))
    magnitude = np.abs(f32(y)).sum(1) + np.abs(f32(y_shared))  # fp32 reordering noise scales with the terms
    allowed = ulp(f32(y), dtype).sum(1) + ulp(f32(y_shared), dtype) + ulp(expected, dtype) + 1e-5 * magnitude
    assert (np.abs(f32(out) - expected) <= allowed).all()

    ours = mk.experts(x, weights, indices, routed, shared, LIMIT, False)
    assert_end_to_end_close(f32(ours), f32(moe_reference(x, weights, indices, routed, shared)), 2.0**-7)
    assert emulated == [f"moe_gate_up_shared_{mode}", f"moe_gate_up_{mode}", f"moe_down_shared_{mode}",
                        f"moe_gate_up_shared_{mode}", f"moe_down_shared_{mode}"]


def test_emulated_moe_layer_with_the_shared_expert(emulated, monkeypatch):
    """layers.moe.MoE at the Flash geometry (8 warps, 2 rows each) with 2-bit g128 routed experts, an mxfp8 shared
    expert and FP8-simulated activations: kernels (two launches and the hidden round trip between them) against
    the same layer with the kernels off."""
    from ds4_mlx.config import ModelArgs
    from ds4_mlx.layers.moe import MoE

    args = ModelArgs(hidden_size=128, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=6,
                     num_hash_layers=0, vocab_size=64, fp8_activations=True, swiglu_limit=LIMIT,
                     num_hidden_layers=1, compress_ratios=[0, 0])
    layer = MoE(args, layer_id=0)
    w1, w2, w3 = make_experts(8, 128, 128, "affine", 2, 128, seed=3)
    layer.experts.w1, layer.experts.w2, layer.experts.w3 = w1, w2, w3
    shared = make_shared(128, 128, seed=4)
    layer.shared_experts.w1, layer.shared_experts.w2, layer.shared_experts.w3 = shared.w1, shared.w2, shared.w3
    layer.gate.weight = mx.random.normal((8, 128), key=mx.random.key(5)) * 0.1
    x = mx.random.normal((1, 1, 128), key=mx.random.key(6)).astype(mx.bfloat16) * 8
    ours = layer(x, mx.array([[3]], dtype=mx.int32))
    assert [n for n in emulated if n.startswith("moe_")] == ["moe_gate_up_shared_affine", "moe_down_shared_affine"]
    assert emulated.count("block_round_trip") == 2  # the input's and the hidden rows' FP8 round trips
    launched = len(emulated)
    monkeypatch.setattr(backend, "backend", lambda: None)  # no kernel backend: the layer's MLX path
    reference = layer(x, mx.array([[3]], dtype=mx.int32))
    assert len(emulated) == launched
    assert ours.dtype == reference.dtype == mx.bfloat16
    assert_end_to_end_close(f32(ours), f32(reference), 2.0**-7)


def test_shared_row_fits_metal_for_q2_and_native():
    """At Flash shapes (k 6, inter 2048, bf16) Metal's 32 KB hold the down group with the shared row for q2's 2-bit
    g128 and native's mxfp4 routed experts, not for q4's 4-bit g64 (word sums twice as many); CUDA's 48 KB: all."""
    fits = {fmt: mk.down_bytes(6, 2048, fmt, True, object()) for fmt in (
        mk.Format("affine", 2, 128), mk.Format("mxfp4", 4, 32), mk.Format("affine", 4, 64))}
    assert [b <= mk.SHARED_BYTES["metal"] for b in fits.values()] == [True, True, False]
    assert all(b <= mk.SHARED_BYTES["cuda"] for b in fits.values())
    assert mk.down_bytes(6, 2048, mk.Format("affine", 4, 64), True, None) <= mk.SHARED_BYTES["metal"]


def test_shared_expert_apart_where_it_does_not_fit(small_geometry, emulated, monkeypatch):
    """An unquantized or non-mxfp8 shared expert, or a down kernel whose staged rows exceed the group memory with
    the shared row (and not without it): `experts` gives None (MoE then runs the routed kernels alone)."""
    w1, w2, w3 = make_experts(8, 64, 64, "affine", 4, 32, seed=1)
    routed = SimpleNamespace(w1=w1, w2=w2, w3=w3)
    x, weights, indices = make_inputs(1, 2, 8, 64, mx.bfloat16, seed=2)
    unquantized = SimpleNamespace(w1=Linear(64, 64), w2=Linear(64, 64), w3=Linear(64, 64))
    affine = SimpleNamespace(**{n: getattr(unquantized, n).to_quantized(32, 8, "affine") for n in ("w1", "w2", "w3")})
    for shared in (unquantized, affine):
        assert not mk.shared_applies(shared, 64, 64)
        assert mk.experts(x, weights, indices, routed, shared, LIMIT, False) is None
    staged = mk.down_bytes(2, 64, mk.Format("affine", 4, 32), True, None)  # the down group without the shared row
    monkeypatch.setattr(mk, "SHARED_BYTES", {"cuda": staged, "metal": staged})
    assert mk.experts(x, weights, indices, routed, make_shared(64, 64), LIMIT, False) is None
    assert mk.routed_experts(x, weights, indices, w1, w2, w3, LIMIT, False) is not None
    assert emulated == ["moe_gate_up_shared_affine", "moe_gate_up_affine", "moe_down_affine"]


# ---- prefill: grouped tensor-core products (custom_kernels/moe_prefill.py, prefill_matmul.py) ----

def rounded_experts(linears, dtype):
    """Unquantized stacked linears holding the weights moe_prefill multiplies with (conftest.kernel_weights)."""
    out = []
    for q in linears:
        w = kernel_weights(q, dtype)
        linear = StackedLinear(w.shape[2], w.shape[1], w.shape[0])
        linear.weight = w.astype(dtype)
        out.append(linear)
    return out


@pytest.mark.parametrize("bits,group_size", [(2, 128), (4, 64)])
def test_prefill_grouped_product_emulated(emulated, bits, group_size):
    """200 bf16 tokens x k 6 over 70 experts (dim 256 != inter 128): expert 3 is every token's (200 rows:
    three full tiles and a partial one), the others come from a pool that leaves most experts empty.
    Against the reference on the same bf16-rounded weights: only the fp32 sum order and so rare one-ulp
    flips of the rounded products differ. (Against gather_qmm on the quantized weights the distance is
    that of MLX's own roundings: 1.3% end to end for 4-bit g64 here.)"""
    from ds4_mlx.custom_kernels import moe_prefill

    dim, inter = 256, 128
    w1, w2, w3 = make_experts(70, dim, inter, "affine", bits, group_size, seed=bits)
    x, weights, _ = make_inputs(200, 6, 70, dim, mx.bfloat16, seed=3, x_scale=4.0)
    pool = [0, 1, 2, 4, 5, 20, 21, 22, 64, 65, 66, 67, 68, 69]
    rng = np.random.default_rng(4)
    indices = mx.array(np.stack([[3, *rng.choice(pool, 5, replace=False)] for _ in range(200)]), dtype=mx.int32)
    assert moe_prefill.applies(x, indices, w1, w2, w3)
    rounded = rounded_experts((w1, w2, w3), mx.bfloat16)
    for fp8 in (False, True):
        ours = mk.routed_experts(x, weights, indices, w1, w2, w3, LIMIT, fp8)
        same_weights = routed_experts_reference(x, weights, indices, *rounded, LIMIT, fp8)
        assert_end_to_end_close(ours, same_weights, 2.0**-8)
    # FP8 activations: the hidden round trip (custom_kernels/rounding.py) between the products, and in the reference
    assert [n for n in emulated if n != "block_round_trip"] == ["prefill_gate_up_affine", "prefill_matmul_affine"] * 2
    assert emulated.count("block_round_trip") == 2


def test_prefill_path_choice():
    from ds4_mlx.custom_kernels import moe_prefill

    w1, w2, w3 = make_experts(8, 128, 64, "affine", 4, 64, seed=1)
    x, _, indices = make_inputs(200, 6, 8, 128, mx.bfloat16, seed=3)
    assert moe_prefill.applies(x, indices, w1, w2, w3)
    assert not moe_prefill.applies(x[:100], indices[:100], w1, w2, w3)  # 600 rows < PREFILL_ROWS
    assert not moe_prefill.applies(x.astype(mx.float32), indices, w1, w2, w3)  # no fp32 tensor-core path
    assert not moe_prefill.applies(x, indices, *make_experts(8, 128, 64, "mxfp4", 4, 32, seed=1))
    assert not moe_prefill.applies(x[:, :96], indices, *make_experts(8, 96, 64, "affine", 4, 32, seed=1))


def test_prefill_kernels_are_cuda_only(monkeypatch):
    """On Metal the grouped products are not launched: the reference (MLX's gather_qmm) runs."""
    from ds4_mlx.custom_kernels import moe_prefill

    launched = record_launches(monkeypatch)
    monkeypatch.setattr(backend, "backend", lambda: "metal")
    w1, w2, w3 = make_experts(8, 128, 64, "affine", 4, 64, seed=1)
    x, weights, indices = make_inputs(200, 6, 8, 128, mx.bfloat16, seed=3)
    ours = moe_prefill.routed_experts(x, weights, indices, w1, w2, w3, LIMIT, False)
    reference = routed_experts_reference(x, weights, indices, w1, w2, w3, LIMIT, False)
    np.testing.assert_array_equal(np.array(ours), np.array(reference))
    assert launched == []


# ---- GPU (run on the GPU machine with `pytest -m gpu`) ----

def _require_gpu():
    assert backend.backend() is not None, "no GPU kernel backend (Metal or CUDA) available"


@pytest.fixture(scope="module", params=[("affine", 2, 128), ("affine", 4, 64), ("mxfp4", 4, 32)],
                ids=lambda p: f"{p[0]}-{p[1]}bit-g{p[2]}")
def flash_experts(request):
    """256 experts at Flash shapes (hidden 4096, moe_intermediate 2048)."""
    if backend.backend() is None:
        pytest.fail("no GPU kernel backend (Metal or CUDA) available")
    return request.param, make_experts(256, 4096, 2048, *request.param, seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_gpu_flash_shapes(flash_experts, launches, n_tokens):
    _require_gpu()
    (mode, _, _), (w1, w2, w3) = flash_experts
    x, weights, indices = make_inputs(n_tokens, 6, 256, 4096, mx.bfloat16, seed=n_tokens, x_scale=8.0)
    # the oracle runs on the CPU, which rounds each product once from an fp32 sum (layers/linear.py's
    # _exact) as the kernels do; MLX's CUDA affine gather_qmm rounds its partial products in the
    # activation dtype, so near-cancelling sums (|gate| << |x| |w|) differ from it by many ulps
    check_all_stages(x, weights, indices, w1, w2, w3, flips=0.05, oracle=mx.cpu)
    assert launches == [f"moe_gate_up_{mode}", f"moe_down_{mode}"] * 2


@pytest.mark.gpu
def test_gpu_flash_shapes_with_the_shared_expert(flash_experts, launches):
    """One token through the 256 Flash experts and an mxfp8 shared expert [2048 x 4096] in the two shared launches,
    against MoE's expression on the CPU. On Metal the shared row does not fit the down kernel's 32 KB: None."""
    _require_gpu()
    (mode, _, _), (w1, w2, w3) = flash_experts
    routed, shared = SimpleNamespace(w1=w1, w2=w2, w3=w3), make_shared(4096, 2048, seed=2)
    x, weights, indices = make_inputs(1, 6, 256, 4096, mx.bfloat16, seed=7, x_scale=8.0)
    ours = mk.experts(x, weights, indices, routed, shared, LIMIT, True)
    if backend.backend() == "metal" and (mode, w1.bits) == ("affine", 4):
        assert ours is None
        return
    with mx.stream(mx.cpu):
        reference = moe_reference(x, weights, indices, routed, shared, fp8=True)
        mx.eval(reference)
    assert_end_to_end_close(f32(ours), f32(reference), 2.0**-7)
    assert launches == [f"moe_gate_up_shared_{mode}", "block_round_trip", f"moe_down_shared_{mode}"]


def expert_subset(linears, experts):
    """Copies of stacked (quantized) linears holding only the listed experts, in that order."""
    out = []
    for linear in linears:
        part = copy.copy(linear)
        for name in ("weight", "scales", "biases"):
            if name in linear:
                part[name] = linear[name][experts]
        out.append(part)
    return out


@pytest.mark.gpu
def test_gpu_prefill_grouped_product(flash_experts, monkeypatch):
    """176 tokens (1056 rows) through the wrapper over the 256 experts, routed to every eighth expert only
    (224 of them get no rows): affine experts take moe_prefill's grouped products (against the reference on
    the same bf16-rounded weights, rounded_experts), mxfp4 keeps gather_qmm (against the reference on the
    quantized weights). The oracle runs on the CPU over the 32 routed experts alone."""
    from ds4_mlx.custom_kernels import moe_prefill

    _require_gpu()
    (mode, _, _), (w1, w2, w3) = flash_experts
    used = []
    monkeypatch.setattr(moe_prefill, "routed_experts",
                        lambda *a, _f=moe_prefill.routed_experts: used.append(1) or _f(*a))
    x, weights, local = make_inputs(176, 6, 32, 4096, mx.bfloat16, seed=5, x_scale=1.0)
    routed = mx.arange(0, 256, 8)
    ours = mk.routed_experts(x, weights, routed[local], w1, w2, w3, LIMIT, False)
    with mx.stream(mx.cpu):
        subset = expert_subset((w1, w2, w3), routed)
        oracle = rounded_experts(subset, mx.bfloat16) if mode == "affine" else subset
        reference = routed_experts_reference(x, weights, local, *oracle, LIMIT, False)
        mx.eval(reference)
    assert used == ([1] if mode == "affine" else [])
    assert_end_to_end_close(ours, reference)


@pytest.fixture(scope="module", params=["native", "q2", "q4"])
def small_model_dir(request, tmp_path_factory, small_checkpoint, small_native):
    """The SMALL test model with routed experts as mxfp4 (native), 2-bit g128 (q2), 4-bit g64 (q4)."""
    if request.param == "native":
        return "mxfp4", small_native
    from ds4_mlx.convert import convert

    out = tmp_path_factory.mktemp("moe-kernel") / request.param
    convert(small_checkpoint, out, recipe=request.param)
    return "affine", out


@pytest.mark.gpu
@pytest.mark.parametrize("activations", ["float32", "bfloat16"])
def test_gpu_tiny_model_with_and_without_the_moe_kernel(monkeypatch, launches, small_model_dir, activations):
    """A 12-token prefill (reference path), a 4-token chunk and 24 decode steps (kernel path: routed and shared
    experts together) of the SMALL model with the MoE kernels vs the reference (other kernels on in both runs)."""
    from conftest import load_fp32, random_ids, run_chunks

    from ds4_mlx import load_model
    from ds4_mlx.layers import moe as moe_layer

    _require_gpu()
    mode, path = small_model_dir
    model = load_fp32(path) if activations == "float32" else load_model(path)
    ids = random_ids(40, 512, seed=4)
    ours = run_chunks(model, ids, [12, 4])
    assert launches.count(f"moe_down_shared_{mode}") >= 25 * model.args.num_hidden_layers
    monkeypatch.setattr(moe_layer.moe_kernels, "experts", lambda *args: None)
    monkeypatch.setattr(moe_layer.moe_kernels, "routed_experts", routed_experts_reference)
    reference = run_chunks(model, ids, [12, 4])
    delta = np.abs(ours - reference).max(-1)
    agree = (ours.argmax(-1) == reference.argmax(-1)).mean()
    if activations == "float32":  # fp32 reordering noise; a near-tie router flip allowed
        assert (delta > 1e-3).mean() <= 1 / 40, delta
    else:  # bf16 rounding noise (as tests/test_invariance.py allows on a GPU)
        assert np.median(delta) <= 0.1 and agree >= 0.95, (np.median(delta), agree)


def test_emulated_small_model_with_the_moe_kernels(small_native, small_geometry, monkeypatch):
    """The SMALL model (fp32; mxfp4 routed experts, mxfp8 shared expert) prefilling 12 tokens (the reference's
    path), then a 2-token chunk and a single token through the MoE kernels (routed and shared together), every
    other kernel on its reference: the logits of the pure-MLX path within fp32 noise."""
    from conftest import SMALL, load_fp32, random_ids, run_chunks
    from kernel_emulator import references_for

    model = load_fp32(small_native)
    ids = random_ids(15, SMALL["vocab_size"], seed=6)
    off = run_chunks(model, ids, [12, 2])
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    references_for(monkeypatch, lambda name: not name.startswith("moe_"))
    on = run_chunks(model, ids, [12, 2])
    assert launched == ["moe_gate_up_shared_mxfp4", "moe_down_shared_mxfp4"] * 2 * SMALL["num_hidden_layers"]
    np.testing.assert_allclose(on, off, rtol=0, atol=1e-4 * np.abs(off).max())
