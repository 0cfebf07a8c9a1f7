"""Prefill attention on the tensor cores (custom_kernels/prefill_attention.py) against the pure-MLX reference
(`Attention._attend_block` over the same queries and keys): emulated on the CPU at small shapes, on the GPU
at Flash shapes.

Tolerance: both multiply the same bf16/fp16 values with fp32 sums, in another order; a score's last fp32 bit
can then flip a probability's rounding to the activation dtype (2^-9 relative) and the output's final
rounding: max error 2^-8 of the largest value, mean error far below.
"""

import mlx.core as mx
import numpy as np
import pytest

from kernel_emulator import emulate, record_launches
from test_kernel_attention import case_inputs, csa_with_indexer, make_layer

from ds4_mlx.custom_kernels import attention as decode_kernels
from ds4_mlx.custom_kernels import backend
from ds4_mlx.custom_kernels import prefill_attention as kernels

KERNELS = ["prefill_scores", "prefill_values"]


def reference(layer, q, start, window_keys, compressed, selection):
    """All queries of the chunk in one pure-MLX block."""
    return layer._attend_block(q, start, window_keys[:, 1 : layer.window + q.shape[1]], compressed, selection)


def attend(layer, q, start, window_keys, compressed, selection, first=0, count=None):
    count = q.shape[1] - first if count is None else count
    picks = None if selection is None else decode_kernels.pick_rows(selection)[:, first : first + count]
    return kernels.attend(q, window_keys, compressed, picks, layer.attn_sink, start=start, first=first, count=count,
                          ratio=layer.ratio, scale=layer.scale,
                          reference=lambda: pytest.fail("the kernel path fell back to the reference"))


def assert_close(out, ref, window_keys, compressed):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    vmax = max(np.abs(np.array(k.astype(mx.float32))).max() for k in (window_keys, compressed) if k is not None)
    out, ref = np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert np.isfinite(out).all()
    err = np.abs(out - ref)
    assert err.max() <= 2**-8 * vmax, (err.max(), vmax)
    assert err.mean() <= 2**-14 * vmax, (err.mean(), vmax)


# (name, ratio, batch, queries, start, compressed rows, picks, heads, head_dim, dtype)
CASES = [
    ("window-chunk-start", 0, 1, 40, 0, 0, 0, 4, 64, mx.bfloat16),
    ("window-wrapped", 0, 1, 37, 50, 0, 0, 4, 128, mx.bfloat16),
    ("hca-visibility", 128, 1, 30, 128 * 5 - 10, 5, 0, 4, 64, mx.bfloat16),
    ("hca-two-column-tiles", 128, 1, 12, 128 * 70, 70, 0, 4, 64, mx.float16),
    ("csa-dense", 4, 1, 20, 9, 7, 0, 4, 64, mx.bfloat16),
    ("csa-invalid-picks", 4, 2, 24, 20, 16, 8, 4, 64, mx.bfloat16),
    ("72-heads", 128, 1, 9, 300, 2, 0, 72, 64, mx.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_reference(monkeypatch, case):
    _, ratio, batch, queries, start, n_rows, picks, heads, head_dim, dtype = case
    layer = make_layer(heads, head_dim, 16, ratio)
    q, window_keys, compressed, selection = case_inputs(layer, batch, queries, start, n_rows, dtype,
                                                         seed=CASES.index(case), picks=picks)
    expected = reference(layer, q, start, window_keys, compressed, selection)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    assert kernels.applies(q, window_keys, compressed)
    assert_close(attend(layer, q, start, window_keys, compressed, selection), expected, window_keys, compressed)
    assert launched == KERNELS
    if queries > 20:  # a later block of the chunk's queries, as the layer launches them
        out = attend(layer, q, start, window_keys, compressed, selection, first=11, count=9)
        assert_close(out, expected[:, 11:20], window_keys, compressed)


def test_layer_prefill_in_blocks(monkeypatch):
    """`Attention._attend` on a CSA layer with more rows than top-k: the indexer's picks for 40 queries, the
    score budgets cut to force two attention blocks of two pick blocks each, against the pure-MLX path."""
    start, n_rows = 50, 22
    layer, (q, window_keys, compressed), index = csa_with_indexer(start, 40, n_rows)
    expected = layer._attend(q, start, window_keys, compressed, index)
    emulate(monkeypatch)
    launched = record_launches(monkeypatch)
    monkeypatch.setattr(kernels, "SCORE_BUDGET", 4 * 64 * 20)  # 20 queries (4 heads, 64 columns) at a time
    monkeypatch.setattr("ds4_mlx.layers.attention.SCORE_BUDGET", n_rows * 12)  # their picks 10 at a time
    out = layer._attend(q, start, window_keys, compressed, index)
    assert_close(out, expected, window_keys, compressed)
    assert [n for n in launched if n in KERNELS] == KERNELS * 2
    assert launched.count("prefill_index_scores") == 4


def test_where_the_kernels_do_not_apply(monkeypatch):
    """fp32 queries, head dims that are not whole tiles, keys of another dtype, Metal: the pure-MLX path."""
    layer = make_layer(4, 64, 16, 0)
    q, window_keys, _, _ = case_inputs(layer, 1, 20, 3, 0, mx.bfloat16, seed=2)
    emulate(monkeypatch)
    assert not kernels.applies(q.astype(mx.float32), window_keys.astype(mx.float32), None)
    assert not kernels.applies(q, window_keys.astype(mx.float16), None)
    assert not kernels.applies(q[..., :48], window_keys[..., :48], None)
    monkeypatch.setattr(backend, "backend", lambda: "metal")
    assert not kernels.applies(q, window_keys, None)
    launched = record_launches(monkeypatch)
    out = layer._attend(q, 3, window_keys, None, None)
    assert mx.array_equal(out, reference(layer, q, 3, window_keys, None, None)).item()
    assert launched == []


# ---- GPU (run on the GPU machine with `pytest -m gpu`) ----

FLASH_CASES = [  # (name, ratio, queries, start, compressed rows, picks)
    ("window-first-chunk", 0, 2048, 0, 0, 0),
    ("hca-8k", 128, 1024, 8192, 72, 0),
    ("csa-8k-picks", 4, 512, 8192, 2560, 512),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FLASH_CASES, ids=[c[0] for c in FLASH_CASES])
def test_flash_shapes_on_gpu(case):
    """64 heads of 512 dims, window 128, against the pure-MLX reference on the GPU (kernels off)."""
    assert backend.backend() == "cuda", "the prefill attention kernels are CUDA-only"
    _, ratio, queries, start, n_rows, picks = case
    layer = make_layer(64, 512, 128, ratio, topk=512)
    q, window_keys, compressed, selection = case_inputs(layer, 1, queries, start, n_rows, mx.bfloat16, seed=3,
                                                         picks=picks)
    backend.set_enabled(False)
    try:
        expected = layer._attend_range(q, start, window_keys, compressed, None, 0, queries) if not picks else \
            mx.concatenate([reference(layer, q[:, a : a + 64], start + a, window_keys[:, a : a + 128 + 64], compressed,
                                      tuple(s[:, a : a + 64] for s in selection)) for a in range(0, queries, 64)], 1)
        mx.eval(expected)
    finally:
        backend.set_enabled(True)
    out = attend(layer, q, start, window_keys, compressed, selection)
    assert_close(out, expected, window_keys, compressed)
