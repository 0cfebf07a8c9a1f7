"""mHC collapse/expand kernels (custom_kernels/hyper_connections.py) against the pure-MLX reference.

The kernels compute the same fp32 formulas; only the order of fp32 sums differs (the 24 dot
products of length hc*D and the sum of squares are split over groups and warps; the MLX matmul
sums in its own order). That moves mixes by ~1e-7 relative, so post and comb (fp32, after
sigmoids and 20 Sinkhorn steps, which are contractive) agree within 1e-5, and the bf16 outputs are
the same bf16 value except where the fp32 value lies within ~1e-6 of a rounding boundary: those
elements differ by exactly one bf16 ulp (we allow at most 1 ulp anywhere and 1% of elements).
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from kernel_emulator import emulate, record_launches

from ds4_mlx.custom_kernels import backend
from ds4_mlx.custom_kernels import hyper_connections as hk
from ds4_mlx.layers.hyper_connections import collapse_reference, expand_reference

HC, ITERS, EPS, NORM_EPS = 4, 20, 1e-6, 1e-6


def hc_params(dim, seed, comb_scale=1.0):
    """fn, base, scale like the test checkpoints (and the real model's ranges)."""
    rng = np.random.default_rng(seed)
    n, k = (2 + HC) * HC, HC * dim
    fn = rng.normal(0, 1 / math.sqrt(k), (n, k))
    base = np.concatenate([rng.normal(-1, 0.3, HC), rng.normal(0, 0.3, HC), rng.normal(0, comb_scale, HC * HC)])
    scale = rng.uniform(0.3, 1, 3) * np.array([1, 1, comb_scale])
    return (mx.array(fn, dtype=mx.float32), mx.array(base, dtype=mx.float32), mx.array(scale, dtype=mx.float32))


def random_streams(lead, dim, dtype, seed):
    rng = np.random.default_rng(seed)
    # streams with different scales (as in the model, where they drift apart)
    x = rng.normal(0, 1, (*lead, HC, dim)) * np.array([1.0, 3.0, 0.5, 10.0])[:, None]
    return mx.array(x, dtype=mx.float32).astype(dtype)


def bf16_ulp(x):
    x = np.maximum(np.abs(x), np.float32(2.0**-126))
    return 2.0 ** (np.floor(np.log2(x)) - 7)


def assert_close_out(ours, reference, noise=0.0):
    """bf16/fp16 outputs: at most one ulp apart (plus `noise`, an absolute allowance per element),
    and rarely; fp32 outputs: fp32 reordering noise."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    a, b = np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32))
    if reference.dtype == mx.float32:
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())
        return
    # one ulp of the larger of the two: a value just below a power of two and its neighbour above
    # are one ulp apart in the upper binade
    top = np.maximum(np.abs(a), np.abs(b))
    ulp = bf16_ulp(top) if reference.dtype == mx.bfloat16 else np.maximum(top, 2.0**-14) * 2.0**-10
    diff = np.abs(a - b)
    assert (diff <= ulp * 1.0001 + noise).all(), (diff - ulp).max()
    assert (diff > 0).mean() <= 0.01, (diff > 0).mean()


def assert_collapse_matches(ours, reference, streams=None):
    """With `streams`, y = sum_i pre_i x_i may also differ by what the mixes' fp32 sums (over hc * dim
    terms, summed in another order) move pre by: up to the 1e-5 allowed for post and comb, times
    sum_i |x_i| (visible where the terms cancel)."""
    (y, post, comb), (y_ref, post_ref, comb_ref) = ours, reference
    assert post.dtype == comb.dtype == mx.float32
    np.testing.assert_allclose(np.array(post), np.array(post_ref), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(comb), np.array(comb_ref), rtol=0, atol=1e-5)
    noise = 0.0 if streams is None else 1e-5 * np.abs(np.array(streams.astype(mx.float32))).sum(-2)
    assert_close_out(y, y_ref, noise)


SMALL_GEOMETRY = {"MIX_THREADS": 64, "MIX_PER_THREAD": 1, "FINISH_THREADS": 64, "FINISH_PER_THREAD": 1}
# (geometry, dim, rows as (B, L), dtype). default: one group covers a whole small row; split:
# 64-column slices, so several mix partials per row, a partial last slice (208*4 = 13 slices of
# 64) and several finish groups per row with a partial last one (208 = 3*64 + 16).
COLLAPSE_CASES = [("default", dim, lead, dtype) for dim in (64, 208) for lead in ((1, 1), (1, 3))
                  for dtype in (mx.bfloat16, mx.float32)]
COLLAPSE_CASES += [("split", 208, (1, 1), mx.bfloat16), ("split", 208, (3, 1), mx.float32)]


@pytest.mark.parametrize("geometry, dim, lead, dtype", COLLAPSE_CASES,
                         ids=[f"{g}-{d}-{b}x{n}-{str(t).split('.')[-1]}" for g, d, (b, n), t in COLLAPSE_CASES])
def test_collapse_matches_reference(monkeypatch, geometry, dim, lead, dtype):
    if geometry == "split":
        for name, value in SMALL_GEOMETRY.items():
            monkeypatch.setattr(hk, name, value)
    fn, base, scale = hc_params(dim, seed=dim)
    streams = random_streams(lead, dim, dtype, seed=len(lead) + dim)
    reference = collapse_reference(streams, fn, base, scale, ITERS, EPS, NORM_EPS)
    emulate(monkeypatch)
    ours = hk.collapse(streams, fn, base, scale, ITERS, EPS, NORM_EPS)
    assert ours[0].shape == (*lead, dim) and ours[1].shape == (*lead, HC) and ours[2].shape == (*lead, HC, HC)
    assert_collapse_matches(ours, reference)


@pytest.mark.parametrize("comb_scale", [8.0, 0.0])
def test_collapse_sinkhorn_edges(monkeypatch, comb_scale):
    """Peaked comb logits (softmax near one-hot, Sinkhorn far from its start) and all-equal logits."""
    fn, base, scale = hc_params(64, seed=5, comb_scale=comb_scale)
    streams = random_streams((3, 1), 64, mx.bfloat16, seed=6)
    reference = collapse_reference(streams, fn, base, scale, ITERS, EPS, NORM_EPS)
    emulate(monkeypatch)
    assert_collapse_matches(hk.collapse(streams, fn, base, scale, ITERS, EPS, NORM_EPS), reference)
    np.testing.assert_allclose(np.array(reference[2]).sum(-2), 1, atol=1e-4)  # columns normalised last


def test_collapse_one_sinkhorn_iteration(monkeypatch):
    fn, base, scale = hc_params(64, seed=7)
    streams = random_streams((1, 1), 64, mx.bfloat16, seed=8)
    reference = collapse_reference(streams, fn, base, scale, 1, EPS, NORM_EPS)
    emulate(monkeypatch)
    assert_collapse_matches(hk.collapse(streams, fn, base, scale, 1, EPS, NORM_EPS), reference)


@pytest.mark.parametrize("dim, lead, dtype", [(64, (1, hk.MAX_ROWS + 1), mx.bfloat16), (208, (2, 30), mx.float32)])
def test_collapse_many_rows(monkeypatch, dim, lead, dtype):
    """Prefill-sized collapses: the mixes' products in MLX, then the finish kernel only."""
    fn, base, scale = hc_params(dim, seed=9)
    streams = random_streams(lead, dim, dtype, seed=10)
    reference = collapse_reference(streams, fn, base, scale, ITERS, EPS, NORM_EPS)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    assert_collapse_matches(hk.collapse(streams, fn, base, scale, ITERS, EPS, NORM_EPS), reference, streams)
    assert launched == ["hc_collapse_finish"]


def expand_inputs(lead, dim, dtype, seed):
    fn, base, scale = hc_params(dim, seed=seed)
    streams = random_streams(lead, dim, dtype, seed=seed + 1)
    _, post, comb = collapse_reference(streams, fn, base, scale, ITERS, EPS, NORM_EPS)
    output = mx.array(np.random.default_rng(seed + 2).normal(0, 2, (*lead, dim)), dtype=mx.float32).astype(dtype)
    return output, streams, post, comb


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("lead", [(1, 1), (2, 5)])
@pytest.mark.parametrize("dim", [96, 256])
def test_expand_matches_reference(monkeypatch, dim, lead, dtype):
    output, streams, post, comb = expand_inputs(lead, dim, dtype, seed=dim + lead[1])
    reference = expand_reference(output, streams, post, comb)
    emulate(monkeypatch)
    assert_close_out(hk.expand(output, streams, post, comb), reference)


def test_layer_calls_the_kernels(monkeypatch):
    """HyperConnection.collapse/expand go through the wrappers (kernels on a GPU backend)."""
    from ds4_mlx.config import ModelArgs
    from ds4_mlx.layers.hyper_connections import HyperConnection

    args = ModelArgs(hidden_size=64, hc_mult=HC, num_hidden_layers=1, compress_ratios=[0, 0])
    layer = HyperConnection(args)
    layer.fn, layer.base, layer.scale = hc_params(64, seed=11)
    streams = random_streams((1, 1), 64, mx.bfloat16, seed=12)
    reference = collapse_reference(streams, layer.fn, layer.base, layer.scale, layer.iters, layer.eps,
                                   layer.norm_eps)
    launched = []
    emulate(monkeypatch)
    launch = backend.Kernel.launch
    monkeypatch.setattr(backend.Kernel, "launch", lambda self, *a: launched.append(self.name) or launch(self, *a))
    x, post, comb = layer.collapse(streams)
    assert_collapse_matches((x, post, comb), reference)
    new = HyperConnection.expand(x, streams, post, comb)
    assert_close_out(new, expand_reference(x, streams, post, comb))
    assert launched == ["hc_mix_partials", "hc_collapse_finish", "hc_expand"]


# ---- GPU (run on the GPU machine with `pytest -m gpu`) ----

def _require_gpu():
    assert backend.backend() is not None, "no GPU kernel backend (Metal or CUDA) available"


def _reference_on_cpu(fn):
    """The oracle on the CPU: MLX's GPU backends fuse and reorder the reference's elementwise ops,
    rounding intermediate bf16 values differently from the round-once definition."""
    with mx.stream(mx.cpu):
        out = fn()
        mx.eval(out)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 16), (1, 2048)])
def test_gpu_flash_shapes(dtype, lead):
    _require_gpu()
    dim = 4096
    fn, base, scale = hc_params(dim, seed=1)
    streams = random_streams(lead, dim, dtype, seed=2)
    ours = hk.collapse(streams, fn, base, scale, ITERS, EPS, NORM_EPS)  # (1, 2048): the prefill path
    reference = _reference_on_cpu(lambda: collapse_reference(streams, fn, base, scale, ITERS, EPS, NORM_EPS))
    assert_collapse_matches(ours, reference, streams)
    output = mx.array(np.random.default_rng(3).normal(0, 2, (*lead, dim)), dtype=mx.float32).astype(dtype)
    new = hk.expand(output, streams, reference[1], reference[2])
    assert_close_out(new, _reference_on_cpu(lambda: expand_reference(output, streams, reference[1], reference[2])),
                     expand_noise(output, streams, reference[1], reference[2]))


def expand_noise(output, streams, post, comb):
    """What fp32 sums in another order may move an expanded value by: a few fp32 ulps of its terms' absolute
    sum. Visible where the terms cancel: over 2048 x 4 x 4096 values the CPU reference itself is more than
    one bf16 ulp from the exact value rounded once in 61 places (worst: 9.4e-8 off a value of -9.4e-8 whose
    terms add up to 8.0 in absolute value)."""
    o, x = (np.abs(np.array(a.astype(mx.float32))) for a in (output, streams))
    mixed = np.einsum("...ij,...id->...jd", np.abs(np.array(comb)), x)
    terms = np.abs(np.array(post))[..., None] * o[..., None, :] + mixed
    return 2.0**-21 * terms


@pytest.mark.gpu
@pytest.mark.parametrize("activations", ["float32", "bfloat16"])
def test_gpu_tiny_model_with_and_without_the_hc_kernels(monkeypatch, small_native, activations):
    """Decode (and a short prefill) of the SMALL model with the mHC kernels vs the mHC reference
    (other kernels on in both runs)."""
    from conftest import load_fp32, random_ids, run_chunks

    from ds4_mlx import load_model

    _require_gpu()
    model = load_fp32(small_native) if activations == "float32" else load_model(small_native)
    ids = random_ids(48, 512, seed=4)
    ours = run_chunks(model, ids, [12])  # a 12-row prefill (kernel range), then 36 decode steps
    monkeypatch.setattr(hk, "collapse", collapse_reference)
    monkeypatch.setattr(hk, "expand", expand_reference)
    reference = run_chunks(model, ids, [12])
    delta = np.abs(ours - reference).max(-1)
    agree = (ours.argmax(-1) == reference.argmax(-1)).mean()
    if activations == "float32":  # fp32 reordering noise (emulated: identical); a near-tie router flip allowed
        assert (delta > 1e-3).mean() <= 1 / 48, delta
    else:  # bf16 rounding noise: rare 1-ulp flips, amplified by the random tiny model (emulated with
        # 14 tokens: median 0.055, max 0.076, 13 of 14 argmax equal at logit std 1.95)
        assert np.median(delta) <= 0.1 and delta.max() <= 0.5 and agree >= 0.9, (delta, agree)
