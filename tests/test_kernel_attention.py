"""The decode attention kernels (custom_kernels/attention.py) against the pure-MLX reference
(`Attention._attend_block`): emulated on the CPU at small shapes, on the GPU at Flash shapes.

Tolerance (bf16): the kernel rounds each probability to bf16 relative to the running max of its
split, the reference relative to the global max; each rounding is within 2^-9 of p, so the two
outputs differ by at most 2^-8 max|v| before and 2 * 2^-9 |out| <= 2^-8 max|v| after their final
bf16 rounding: 2^-7 max|v| in all. fp32 activations round nothing: only the summation order differs.
"""

import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import SMALL, load_fp32, random_ids, run_chunks
from kernel_emulator import emulate

from ds4_mlx import load_model
from ds4_mlx.config import ModelArgs
from ds4_mlx.custom_kernels import attention as kernels
from ds4_mlx.custom_kernels import backend
from ds4_mlx.layers.attention import Attention

RATIO_LAYER = {0: 0, 4: 1, 128: 2}


def make_layer(heads: int, head_dim: int, window: int, ratio: int, topk: int = 8) -> Attention:
    args = ModelArgs(hidden_size=64, num_hidden_layers=3, compress_ratios=[0, 4, 128], num_attention_heads=heads,
                     head_dim=head_dim, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32,
                     sliding_window=window, index_topk=topk, index_n_heads=4, index_head_dim=32)
    return Attention(args, RATIO_LAYER[ratio])


def case_inputs(layer, batch, queries, start, n_rows, dtype, seed, picks=0, sink=None):
    """Random q, window keys, compressed rows and (with picks = k) a selection with invalid picks
    where fewer than k rows are visible."""
    rng = np.random.default_rng(seed)
    heads, dims, window = layer.n_heads, layer.head_dim, layer.window
    q = mx.array(rng.normal(size=(batch, queries, heads, dims)) * 2.0).astype(dtype)
    window_keys = mx.array(rng.normal(size=(batch, window + queries, dims))).astype(dtype)
    compressed = mx.array(rng.normal(size=(batch, n_rows, dims))).astype(dtype) if n_rows else None
    layer.attn_sink = mx.array(rng.normal(size=(heads,)) if sink is None else sink, dtype=mx.float32)
    selection = None
    if picks:
        chosen = np.stack([np.stack([rng.permutation(n_rows)[:picks] for _ in range(queries)]) for _ in range(batch)])
        visible = (start + np.arange(queries) + 1) // layer.ratio
        selection = (mx.array(chosen.astype(np.uint32)), mx.array(chosen < visible[None, :, None]))
    return q, window_keys, compressed, selection


def reference(layer, q, start, window_keys, compressed, selection):
    keys = window_keys[:, 1 : layer.window + q.shape[1]]
    return layer._attend_block(q, start, keys, compressed, selection)


def kernel(layer, q, start, window_keys, compressed, selection):
    return kernels.decode_attention(q, window_keys, compressed, selection, layer.attn_sink, start=start,
                                    ratio=layer.ratio, scale=layer.scale,
                                    reference=lambda: pytest.fail("the kernel path fell back to the reference"))


def assert_close(out, ref, window_keys, compressed):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    values = [np.abs(np.array(k.astype(mx.float32))).max() for k in (window_keys, compressed) if k is not None]
    vmax = max(values)
    out, ref = np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert np.isfinite(out).all()
    err = np.abs(out - ref)
    if window_keys.dtype == mx.float32:
        assert err.max() <= 1e-5 * vmax, err.max()
    else:
        assert err.max() <= 2**-7 * vmax, (err.max(), vmax)
        assert err.mean() <= 2**-11 * vmax, (err.mean(), vmax)


# (name, ratio, batch, queries, start, compressed rows, picks, head_dim, dtype, sink)
CASES = [
    ("first-token", 0, 1, 1, 0, 0, 0, 64, mx.bfloat16, None),
    ("partial-window", 0, 1, 1, 5, 0, 0, 64, mx.bfloat16, None),
    ("wrapped-window", 0, 1, 1, 40, 0, 0, 128, mx.bfloat16, None),
    ("window-3-queries", 0, 1, 3, 7, 0, 0, 64, mx.bfloat16, None),
    ("hca-no-rows", 128, 1, 1, 100, 0, 0, 64, mx.bfloat16, None),
    ("hca-rows", 128, 1, 1, 128 * 5 + 7, 5, 0, 128, mx.bfloat16, None),
    ("hca-many-rows", 128, 1, 1, 128 * 60 + 1, 60, 0, 64, mx.bfloat16, None),
    ("hca-batch-2", 128, 2, 1, 128 * 20 + 127, 21, 0, 64, mx.bfloat16, None),
    ("csa-dense-visibility", 4, 1, 3, 9, 3, 0, 64, mx.bfloat16, None),
    ("csa-invalid-picks", 4, 2, 2, 20, 12, 8, 64, mx.bfloat16, None),
    ("csa-picks", 4, 1, 1, 63, 16, 8, 128, mx.bfloat16, None),
    ("large-sinks", 128, 1, 1, 128 * 9, 9, 0, 64, mx.bfloat16, [30.0, -30.0, 100.0, 8.0]),
    ("float32", 4, 1, 2, 30, 7, 4, 64, mx.float32, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(monkeypatch, case):
    _, ratio, batch, queries, start, n_rows, picks, head_dim, dtype, sink = case
    layer = make_layer(4, head_dim, 16, ratio)
    q, window_keys, compressed, selection = case_inputs(layer, batch, queries, start, n_rows, dtype, seed=CASES.index(case),
                                                         picks=picks, sink=sink)
    expected = reference(layer, q, start, window_keys, compressed, selection)
    emulate(monkeypatch)
    out = kernel(layer, q, start, window_keys, compressed, selection)
    assert_close(out, expected, window_keys, compressed)


def test_many_splits_and_eight_heads(monkeypatch):
    """8 heads (two head sets of 4 per group) and more splits than one group's worth of keys."""
    layer = make_layer(8, 64, 16, 128)
    q, window_keys, compressed, selection = case_inputs(layer, 1, 1, 128 * 200, 200, mx.bfloat16, seed=5)
    assert kernels._plan(1, 1, 16 + 200, 1)[1] > 8
    expected = reference(layer, q, 128 * 200, window_keys, compressed, selection)
    emulate(monkeypatch)
    assert_close(kernel(layer, q, 128 * 200, window_keys, compressed, selection), expected, window_keys, compressed)


def csa_with_indexer(start, queries, n_rows):
    """A CSA layer (4 heads of 64, window 16, top-8) with random attention and indexer inputs: the layer,
    (q, window_keys, compressed) and the indexer's (queries, head weights, keys)."""
    layer = make_layer(4, 64, 16, 4, topk=8)
    rng = np.random.default_rng(11)
    q, window_keys, compressed, _ = case_inputs(layer, 1, queries, start, n_rows, mx.bfloat16, seed=11)
    index = (mx.array(rng.normal(size=(1, queries, 4, 32))).astype(mx.bfloat16),
             mx.array(rng.normal(size=(1, queries, 4))).astype(mx.bfloat16),
             mx.array(rng.normal(size=(1, n_rows, 32))).astype(mx.bfloat16))
    return layer, (q, window_keys, compressed), index


def test_layer_attend_decode_with_the_indexer(monkeypatch):
    """`Attention._attend` on a CSA layer: the indexer's picks (more rows than top-k), kernel on/off."""
    start = 50
    layer, (q, window_keys, compressed), index = csa_with_indexer(start, 2, 13)
    expected = layer._attend(q, start, window_keys, compressed, index)
    emulate(monkeypatch)
    out = layer._attend(q, start, window_keys, compressed, index)
    assert_close(out, expected, window_keys, compressed)


def test_prefill_keeps_the_query_block_path(monkeypatch):
    layer = make_layer(4, 64, 16, 0)
    queries = kernels.MAX_QUERIES + 1
    q, window_keys, _, _ = case_inputs(layer, 1, queries, 3, 0, mx.bfloat16, seed=2)
    emulate(monkeypatch)
    monkeypatch.setattr(kernels, "decode_attention", lambda *a, **k: pytest.fail("prefill took the decode kernel"))
    layer._attend(q, 3, window_keys, None, None)


# ---- on the GPU (pytest -m gpu) ----------------------------------------------------------------

FLASH_CASES = [  # (name, ratio, start, compressed rows, picks)
    ("window", 0, 5000, 0, 0),
    ("csa-8k", 4, 4 * 8192, 8192, 512),
    ("csa-picks-invalid", 4, 1500, 400, 512),
    ("hca-1k", 128, 128 * 1024, 1024, 0),
    ("hca-8k", 128, 128 * 8192, 8192, 0),
]


def _require_gpu():
    assert backend.backend() is not None, "no GPU backend (Metal or CUDA) for the gpu tests"


def _timed(fn, repeats=20):
    mx.eval(fn())
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - tic) / repeats * 1e6


@pytest.mark.gpu
@pytest.mark.parametrize("queries", [1, 2])
@pytest.mark.parametrize("case", FLASH_CASES, ids=[c[0] for c in FLASH_CASES])
def test_flash_shapes_on_gpu(case, queries):
    _require_gpu()
    _, ratio, start, n_rows, picks = case
    layer = make_layer(64, 512, 128, ratio, topk=512)
    q, window_keys, compressed, selection = case_inputs(layer, 1, queries, start, n_rows, mx.bfloat16, seed=3,
                                                         picks=min(picks, n_rows))
    if selection is not None and picks > n_rows:  # fewer rows than top-k: pad with invalid picks
        rows, valid = selection
        pad = picks - n_rows
        selection = (mx.concatenate([rows, mx.zeros((1, queries, pad), dtype=rows.dtype)], axis=-1),
                     mx.concatenate([valid, mx.zeros((1, queries, pad), dtype=mx.bool_)], axis=-1))
    out = kernel(layer, q, start, window_keys, compressed, selection)
    backend.set_enabled(False)
    try:
        expected = reference(layer, q, start, window_keys, compressed, selection)
        reference_us = _timed(lambda: reference(layer, q, start, window_keys, compressed, selection))
    finally:
        backend.set_enabled(True)
    assert_close(out, expected, window_keys, compressed)
    kernel_us = _timed(lambda: kernel(layer, q, start, window_keys, compressed, selection))
    print(f"{case[0]} Q={queries}: kernel {kernel_us:.1f} us, reference {reference_us:.1f} us")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_tiny_model_kernels_on_vs_off(small_native, precision):
    """Prefill 40 tokens, decode 160 one by one (window wraps, CSA picks, HCA rows): the same
    logits with the kernels on and off (bf16: within bf16 noise, as in test_invariance)."""
    _require_gpu()
    model = load_fp32(small_native) if precision == "float32" else load_model(small_native)
    ids = random_ids(200, SMALL["vocab_size"], seed=4)
    backend.set_enabled(False)
    try:
        off = run_chunks(model, ids, [40])
    finally:
        backend.set_enabled(True)
    on = run_chunks(model, ids, [40])
    delta = np.abs(on - off).max(-1)
    if precision == "float32":
        assert (delta > 1e-3).mean() <= 0.01, np.nonzero(delta > 1e-3)[0]
    else:
        agree = (on.argmax(-1) == off.argmax(-1)).mean()
        assert np.median(delta) <= 0.1 and agree >= 0.95, (np.median(delta), agree)
