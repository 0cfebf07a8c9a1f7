"""The lightning-indexer decode kernel (ds4_mlx/custom_kernels/indexer.py) against the pure-MLX
reference (`layers.indexer.reference_scores`).

Emulated (CPU): the kernel computes each head's dot product in fp32 over d = 0..D-1 and sums the
heads in fp32 in head order, as MLX's CPU matmul and sum do here, and applies the same bf16
roundings, so results are bitwise equal. Inputs whose dot products are exact in fp32 make that
independent of any accumulation order (asserted bitwise); for random inputs a different fp32 order
can move a head's rounded dot product by 1 bf16 ulp, so a few scores may differ by the bound below.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from kernel_emulator import emulate, record_launches

from ds4_mlx.custom_kernels import backend
from ds4_mlx.custom_kernels import indexer as kernel
from ds4_mlx.custom_kernels import prefill_index
from ds4_mlx.layers import indexer as layer
from ds4_mlx.layers.indexer import Indexer, reference_scores


def run_kernel(monkeypatch):
    """Emulate launches (a fallback to the reference fails the test), count launches."""
    emulate(monkeypatch)
    launches = []
    launch = backend.Kernel.launch
    monkeypatch.setattr(backend.Kernel, "launch", lambda self, *a, **kw: launches.append(1) or launch(self, *a, **kw))
    return launches


def make_inputs(batch, n_queries, heads, dim, n_keys, dtype=mx.bfloat16, seed=0, exact=False):
    rng = np.random.default_rng(seed)
    if exact:  # multiples of 1/16 in [-1, 1]: every fp32 partial sum of a dot product is exact
        q = rng.integers(-16, 17, (batch, n_queries, heads, dim)) / 16
        k = rng.integers(-16, 17, (batch, n_keys, dim)) / 16
    else:
        q = rng.standard_normal((batch, n_queries, heads, dim))
        k = rng.standard_normal((batch, n_keys, dim))
    w = rng.standard_normal((batch, n_queries, heads)) * 0.1
    return tuple(mx.array(a.astype(np.float32)).astype(dtype) for a in (q, w, k))


def bound(q, w, k, ref):
    """Largest difference two correct implementations may show: each head's rounded dot product
    may differ by one ulp (<= 2^-7 relative in bf16), which moves its weighted term by at most
    2^-6 |w d| after the product's own rounding; the total's rounding adds one ulp of the total."""
    q64, w64, k64 = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (q, w, k))
    dots = np.einsum("bqhd,bnd->bqhn", q64, k64)
    spread = np.einsum("bqh,bqhn->bqn", np.abs(w64), np.abs(dots))
    eps = {mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10, mx.float32: 2.0**-23}[q.dtype]
    ref = np.array(ref.astype(mx.float32)).astype(np.float64)
    return 2 * eps * spread + eps * np.abs(np.where(np.isfinite(ref), ref, 0)) + 1e-30


def compare(out, ref, q, w, k, exact_fraction=1.0):
    a = np.array(out.astype(mx.float32))
    r = np.array(ref.astype(mx.float32))
    assert a.shape == r.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(r))
    assert np.isfinite(a[~np.isneginf(a)]).all()
    same = (a == r) | (np.isneginf(a) & np.isneginf(r))
    assert same.mean() >= exact_fraction, same.mean()
    finite = ~np.isneginf(r)
    excess = np.abs(a[finite] - r[finite]) - bound(q, w, k, ref)[finite]
    assert excess.size == 0 or excess.max() <= 0, excess.max()


SHAPES = [  # (batch, queries, heads, head dim, keys)
    (1, 1, 4, 32, 1),
    (1, 1, 4, 32, 7),
    (1, 2, 4, 128, 100),
    (1, 2, 4, 32, 300),
    (2, 2, 16, 32, 100),
]

# (heads per thread, max keys per thread, target groups): the default, several head groups, and
# tiles of 8 and 4 keys per thread (a small target keeps the biggest tile for small N)
TILINGS = [(8, 8, 256), (2, 8, 1), (1, 4, 1)]


@pytest.fixture
def tiling(request, monkeypatch):
    heads, keys, target = request.param
    monkeypatch.setattr(kernel, "HEADS", heads)
    monkeypatch.setattr(kernel, "MAX_KEYS", keys)
    monkeypatch.setattr(kernel, "TARGET_GROUPS", target)


@pytest.mark.parametrize("tiling", TILINGS, indirect=True, ids=lambda t: f"ht{t[0]}-kw{t[1]}-g{t[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernel_matches_reference(monkeypatch, tiling, shape):
    launches = run_kernel(monkeypatch)
    batch, n_queries, heads, dim, n_keys = shape
    for exact in (True, False):
        q, w, k = make_inputs(*shape, seed=n_keys, exact=exact)
        visible = [max(0, n_keys - 3 * i) for i in range(n_queries)]
        for vis in (None, visible):
            ref = reference_scores(q, w, k, vis)
            out = Indexer.scores(q, w, k, vis)
            compare(out, ref, q, w, k, exact_fraction=1.0 if exact else 0.99)
    assert len(launches) == 4


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
def test_emulated_other_dtypes(monkeypatch, dtype):
    launches = run_kernel(monkeypatch)
    q, w, k = make_inputs(1, 2, 4, 32, 50, dtype=dtype, seed=3)
    compare(Indexer.scores(q, w, k, [20, 50]), reference_scores(q, w, k, [20, 50]), q, w, k, exact_fraction=0.99)
    assert launches


def test_emulated_visibility_edges(monkeypatch):
    """Counts of 0 (nothing visible), inside a tile, at a tile edge, beyond N; an int array too."""
    launches = run_kernel(monkeypatch)
    monkeypatch.setattr(kernel, "TARGET_GROUPS", 1)  # 128-key tiles
    q, w, k = make_inputs(1, 5, 4, 32, 300, seed=5, exact=True)
    for vis in ([0, 1, 128, 129, 1000], mx.array([0, 1, 128, 129, 1000])):
        compare(Indexer.scores(q, w, k, vis), reference_scores(q, w, k, vis), q, w, k)
    assert len(launches) == 2


def _f32(a):
    return np.array(a.astype(mx.float32))


def test_wrapper_routes(monkeypatch):
    """Mixed dtypes, or fp32 with too many queries for the decode kernel, run the reference; a build failure
    falls back to it."""
    calls = []
    monkeypatch.setattr(backend.Kernel, "launch", lambda *a, **kw: calls.append(1) or 1 / 0)
    monkeypatch.setattr(backend, "backend", lambda: "cuda")
    q, w, k = make_inputs(1, kernel.MAX_QUERIES + 1, 4, 32, 20, dtype=mx.float32)
    assert not prefill_index.applies(q, w, k)
    np.testing.assert_array_equal(_f32(Indexer.scores(q, w, k)), _f32(reference_scores(q, w, k)))
    q, w, k = make_inputs(1, 1, 4, 32, 20)
    assert not kernel.applies(q, w.astype(mx.float32), k)
    assert not calls
    np.testing.assert_array_equal(_f32(Indexer.scores(q, w, k)), _f32(reference_scores(q, w, k)))
    assert calls  # tried, failed, fell back


PREFILL_SHAPES = [  # (batch, queries, heads, head dim, keys, dtype): partial query and key tiles, two key tiles
    (1, 70, 4, 32, 130, mx.bfloat16),
    (2, 9, 3, 128, 64, mx.float16),
]


@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_emulated_prefill_kernel_matches_reference(monkeypatch, shape):
    """More queries than the decode kernel takes: custom_kernels/prefill_index.py (tensor-core tiles)."""
    launches = run_kernel(monkeypatch)
    names = record_launches(monkeypatch)
    *dims, dtype = shape
    for exact in (True, False):
        q, w, k = make_inputs(*dims, dtype=dtype, seed=dims[-1], exact=exact)
        visible = [max(0, dims[-1] - 2 * i) for i in range(dims[1])]
        for vis in (None, visible):
            compare(Indexer.scores(q, w, k, vis), reference_scores(q, w, k, vis), q, w, k,
                    exact_fraction=1.0 if exact else 0.99)
    assert len(launches) == 4 and set(names) == {"prefill_index_scores"}


def test_tile_choice():
    assert kernel._heads_per_thread(64) == 8 and kernel._heads_per_thread(12) == 6
    assert kernel._keys_per_thread(32768, 1) == 8  # 256 groups of 128 keys
    assert kernel._keys_per_thread(8192, 1) == 2
    assert kernel._keys_per_thread(1024, 1) == 1


# ---------------------------------------------------------------- GPU (pytest -m gpu)

FLASH_HEADS, FLASH_DIM = 64, 128


def _require_gpu():
    assert backend.backend() is not None, "no GPU backend (CUDA or Metal) for the kernel tests"


def _flash_inputs(n_queries, n_keys, seed):
    """Flash-like inputs: FP4-grid-ish q and k of unit scale, weights ~ scale 1/(sqrt(128) * 8)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, n_queries, FLASH_HEADS, FLASH_DIM))
    k = rng.standard_normal((1, n_keys, FLASH_DIM))
    w = rng.standard_normal((1, n_queries, FLASH_HEADS)) / (math.sqrt(FLASH_DIM) * 8)
    return tuple(mx.array(a.astype(np.float32)).astype(mx.bfloat16) for a in (q, w, k))


@pytest.mark.gpu
@pytest.mark.parametrize("n_queries", [1, 2])
@pytest.mark.parametrize("n_keys", [1024, 32768, 1000])
def test_gpu_flash_shapes(n_queries, n_keys):
    _require_gpu()
    q, w, k = _flash_inputs(n_queries, n_keys, seed=n_keys + n_queries)
    visible = [n_keys - 5 * i for i in range(n_queries)]
    for vis in (None, visible):
        out = Indexer.scores(q, w, k, vis)
        with mx.stream(mx.cpu):  # the CPU reference: same accumulation orders, nearly bitwise
            cpu = reference_scores(q, w, k, vis)
        compare(out, cpu, q, w, k, exact_fraction=0.99)
        backend.set_enabled(False)
        try:
            gpu = reference_scores(q, w, k, vis)  # the GPU reference path as the model would run it
        finally:
            backend.set_enabled(True)
        compare(out, gpu, q, w, k, exact_fraction=0.9)
        # the top-512 choice the attention makes from these scores
        top = lambda s: np.sort(np.array(mx.argpartition(-s.astype(mx.float32), 511, axis=-1)[..., :512]), -1)
        overlap = np.mean([len(np.intersect1d(a, b)) / 512 for a, b in zip(top(out)[0], top(gpu)[0])])
        assert overlap >= 0.99, overlap


@pytest.mark.gpu
def test_gpu_prefill_flash_shapes():
    """2,048 queries over 3,000 keys (a CSA layer's chunk at 12K context), causal visibility, against the CPU
    reference and the GPU's pure-MLX path."""
    _require_gpu()
    q, w, k = _flash_inputs(2048, 3000, seed=9)
    visible = [(10240 + i + 1) // 4 for i in range(2048)]
    out = Indexer.scores(q, w, k, visible)
    with mx.stream(mx.cpu):
        cpu = reference_scores(q, w, k, visible)
    compare(out, cpu, q, w, k, exact_fraction=0.9)


@pytest.mark.gpu
def test_gpu_tiny_model_kernel_on_and_off(small_native, monkeypatch):
    """Decode token by token with the indexer kernel on, then off (every other kernel as configured):
    bf16 logits agree as test_invariance requires across GPU kernel choices."""
    _require_gpu()
    from conftest import random_ids, run_chunks

    from ds4_mlx import load_model

    model = load_model(small_native)
    ids = random_ids(200, 512, seed=4)
    on = run_chunks(model, ids, [])
    monkeypatch.setattr(kernel, "MAX_QUERIES", 0)  # the wrapper runs the reference
    off = run_chunks(model, ids, [])
    delta = np.abs(on - off).max(-1)
    agree = (on.argmax(-1) == off.argmax(-1)).mean()
    assert np.median(delta) <= 0.1 and agree >= 0.95, (np.median(delta), agree)
    assert layer.index_kernel is kernel


def test_emulated_tiny_model_decode(small_native, monkeypatch):
    """The SMALL model (16 index heads, top-8) decoding token by token past the point where the
    indexer chooses, with only this kernel emulated: the same logits as the reference path."""
    from conftest import random_ids, run_chunks
    from kernel_emulator import emulated_launch

    from ds4_mlx import load_model

    model = load_model(small_native)
    ids = random_ids(60, 512, seed=4)
    off = run_chunks(model, ids, [30])
    launches = []

    def emulated_run(inputs, template, grid, threadgroup, output_shapes, output_dtypes, reference):
        launches.append(1)
        return emulated_launch(kernel.KERNEL, "cuda", inputs, template, grid, threadgroup, output_shapes, output_dtypes)

    monkeypatch.setattr(kernel.KERNEL, "run", emulated_run)
    on = run_chunks(model, ids, [30])
    assert len(launches) >= 2 * 20  # two CSA layers, sparse from 36 tokens on
    np.testing.assert_array_equal(on, off)
