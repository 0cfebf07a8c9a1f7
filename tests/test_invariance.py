"""Chunking, causality and snapshot invariance of the model and its caches.

The SMALL config (conftest) has window-only, CSA (one of them hash-routed) and HCA layers, a
window of 16 and index_topk 8, so 300 tokens wrap the window many times, produce 75 CSA entries
chosen by the indexer and 2 HCA entries, and chunk boundaries cut compressor windows.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import load_fp32, random_ids, run_chunks

from ds4_mlx import load_model
from ds4_mlx.cache import restore, snapshot

LENGTH = 300
CHUNKINGS = [[LENGTH], [37, 101, 1, 2, 60, 99], [3, 4, 5, 200], [128, 128], []]  # the rest token by token


@pytest.fixture(scope="module")
def ids():
    return random_ids(LENGTH, 512, seed=3)


# (activations, index_topk): topk 100 >= the 75 CSA entries takes every visible entry; topk 8
# lets the indexer choose. In float32 the chunkings differ by reduction order (measured <= 3e-4),
# which can flip an indexer choice at a tie of FP4-rounded scores (measured: 1 of 300 positions); bfloat16
# rounds those differences away (measured: identical logits).
SETTINGS = [("float32", 100, 0.0), ("float32", 8, 0.01), ("bfloat16", 8, 0.0)]


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda s: f"{s[0]}-topk{s[1]}")
def model(request, small_native):
    dtype, topk, flips = request.param
    model = load_fp32(small_native, index_topk=topk) if dtype == "float32" else load_model(small_native)
    model.allowed_flips = flips
    return model


def _assert_same(model, ours, reference):
    """Equal within 1e-3 at every position but the allowed fraction of near-tie flips."""
    off = np.abs(ours - reference).max(-1) > 1e-3
    assert off.mean() <= model.allowed_flips, np.nonzero(off)[0]


def test_prefill_chunking_and_decode_give_the_same_logits(model, ids):
    one_shot = run_chunks(model, ids, CHUNKINGS[0])
    assert one_shot.std() > 0.5  # a live model, not a constant
    for chunks in CHUNKINGS[1:]:
        _assert_same(model, run_chunks(model, ids, chunks), one_shot)


def test_logits_of_a_prefix_do_not_depend_on_later_tokens(model, ids):
    full = run_chunks(model, ids, [LENGTH])
    for length in (1, 17, 128, 151):
        _assert_same(model, run_chunks(model, ids[:, :length], [length]), full[:length])


def _continue(model, caches, ids, start):
    return np.array(model(ids[:, start:], caches))[0]


def test_snapshot_restore_continue_equals_uninterrupted(model, ids, tmp_path):
    split = 151  # mid window, mid compressor window, after the first HCA entry
    caches = model.make_cache()
    model(ids[:, :split], caches)
    saved = snapshot(caches)
    uninterrupted = _continue(model, caches, ids, split)

    np.testing.assert_array_equal(_continue(model, restore(model.args, saved), ids, split), uninterrupted)
    # the snapshot is unaffected by the session that went on, and restores twice
    np.testing.assert_array_equal(_continue(model, restore(model.args, saved), ids, split), uninterrupted)

    # through a file, as disk persistence will do
    path = str(tmp_path / "session.safetensors")
    flat = tree_flatten(saved)
    mx.save_safetensors(path, dict(flat))
    loaded = mx.load(path)
    structure = tree_unflatten([(key, loaded[key]) for key, _ in flat])
    np.testing.assert_array_equal(_continue(model, restore(model.args, structure), ids, split), uninterrupted)


def test_mtp_block_chunking(model, ids):
    streams = model.hidden(ids, model.make_cache())
    next_ids = ids[:, 1:]
    streams = streams[:, :-1]
    one_shot = np.array(model.mtp_logits(streams, next_ids, model.make_mtp_cache()))[0]
    cache, parts = model.make_mtp_cache(), []
    for a, b in ((0, 40), (40, 41), (41, 200), (200, LENGTH - 1)):
        parts.append(np.array(model.mtp_logits(streams[:, a:b], next_ids[:, a:b], cache))[0])
    _assert_same(model, np.concatenate(parts), one_shot)


def test_a_batch_gives_each_row_its_own_logits(small_native):
    model = load_model(small_native)
    rows = [random_ids(200, 512, seed=s) for s in (1, 2)]
    batch = mx.concatenate(rows, axis=0)
    caches = model.make_cache()
    logits = [model(batch[:, :150], caches)] + [model(batch[:, p : p + 1], caches) for p in range(150, 200)]
    run_batch = np.array(mx.concatenate(logits, axis=1))
    for i, row in enumerate(rows):
        np.testing.assert_allclose(run_batch[i], run_chunks(model, row, [200]), atol=1e-3, rtol=0)
