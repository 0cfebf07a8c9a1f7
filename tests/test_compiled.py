"""Compiled decode graphs (layers/compiled.py), with the fused element-wise helpers they contain
(numerics.fused_for_decode: RoPE, FP8/FP4 round trips), forced on the CPU: the same logits as the
eager model, traced once per shape (eager first), retraced when the kernel switch changes, and not
holding a dropped model alive."""

import gc
import weakref

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_fp32, random_ids, run_chunks

from ds4_mlx import load_model
from ds4_mlx.layers import compiled


@pytest.fixture
def compiled_on_cpu():
    initial = compiled.enabled()
    compiled.set_enabled(True, cpu=True)
    yield
    compiled.set_enabled(initial)


def _counting(monkeypatch, module, method):
    """Count the eager (uncompiled or tracing) executions of module.method."""
    calls = []
    original = getattr(type(module), method)
    monkeypatch.setattr(type(module), method,
                        lambda self, *a: (self is module and calls.append(1)) or original(self, *a))
    return calls


@pytest.mark.parametrize("activations", ["float32", "bfloat16"])
def test_compiled_decode_matches_eager(small_native, compiled_on_cpu, activations):
    model = load_fp32(small_native) if activations == "float32" else load_model(small_native)
    ids = random_ids(30, 512, seed=2)
    ours = run_chunks(model, ids, [10])  # a 10-token prefill (eager), then 20 compiled decode steps
    compiled.set_enabled(False)
    reference = run_chunks(model, ids, [10])
    if activations == "float32":
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    else:  # fused element-wise chains may round a bf16 intermediate differently
        delta = np.abs(ours - reference).max(-1)
        assert np.median(delta) <= 0.05 and (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9, delta


def test_traced_once_per_shape_and_per_kernel_switch(small_native, compiled_on_cpu, monkeypatch):
    from ds4_mlx.custom_kernels import backend

    model = load_fp32(small_native)
    block = model.layers[0]
    calls = _counting(monkeypatch, block, "feed_forward")
    cache = model.make_cache()
    for t in range(5):
        model(mx.array([[t + 3]], dtype=mx.int32), cache)
    assert len(calls) == 2  # eager once, traced once; then replayed
    backend.set_enabled(not backend.enabled())
    try:
        for t in range(3):
            model(mx.array([[t + 3]], dtype=mx.int32), cache)
    finally:
        backend.set_enabled(not backend.enabled())
    assert len(calls) == 4
    model(mx.array([[3, 4]], dtype=mx.int32), cache)  # a new shape: eager first
    model(mx.array([[3, 4] * 5], dtype=mx.int32), cache)  # prefill-sized: always eager
    assert len(calls) == 6


def test_compiled_graph_does_not_keep_the_model(small_native, compiled_on_cpu):
    model = load_fp32(small_native)
    cache = model.make_cache()
    for t in range(3):
        model(mx.array([[t + 3]], dtype=mx.int32), cache)
    ref = weakref.ref(model.layers[0])
    del model, cache
    gc.collect()
    assert ref() is None
