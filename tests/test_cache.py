"""Cache layout, sizes and growth."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import random_ids
from ds4_mlx import load_model
from ds4_mlx.cache import CSACache, HCACache, RowBuffer, WindowCache, cache_nbytes
from ds4_mlx.config import ModelArgs

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]  # config.json of DeepSeek-V4-Flash (44 entries)


def flash_args() -> ModelArgs:
    return ModelArgs(compress_ratios=FLASH_RATIOS)


def test_flash_schedule_from_config():
    args = flash_args()
    kinds = [args.compress_ratio(i) for i in range(args.num_hidden_layers)]
    assert kinds.count(4) == 21 and kinds.count(128) == 20 and kinds.count(0) == 2
    assert args.compress_ratio(43) == 0  # the MTP layer


def test_flash_bytes_per_token_match_the_spec():
    # spec section 3: bf16 storage holds 21 CSA * (512 + 128) / 4 * 2 B + 20 HCA * 512 / 128 * 2 B
    # = 6,880 B per token of context
    args = flash_args()
    per_token = (cache_nbytes(args, 128 * 1024) - cache_nbytes(args, 64 * 1024)) / (64 * 1024)
    assert per_token == 6880
    # fixed part: 43 windows of 128 x 512 bf16 rows (5.4 MiB) + compressor states in fp32
    # (21 * 80 KiB + 20 * 512 KiB = 11.6 MiB)
    fixed = cache_nbytes(args, 128 * 1024) - 6880 * 128 * 1024
    assert fixed == 43 * 128 * 512 * 2 + (21 * 80 + 20 * 512) * 1024
    # at 1M tokens of context: 7.21 GB of compressed rows (spec), plus the fixed part
    assert round((cache_nbytes(args, 1 << 20) - fixed) / 1e9, 2) == 7.21


@pytest.fixture(scope="module")
def model(official_b_native):
    return load_model(official_b_native)


def test_layer_kinds_and_reported_bytes_match_the_formula(model):
    caches = model.make_cache()
    kinds = [type(c) for c in caches]
    assert kinds == [WindowCache, WindowCache, CSACache, HCACache, CSACache, HCACache]
    ids = random_ids(300, model.args.vocab_size)
    model(ids[:, :260], caches)
    model(ids[:, 260:], caches)
    mx.eval([c.arrays() for c in caches])
    assert sum(c.nbytes for c in caches) == cache_nbytes(model.args, 300)
    assert all(c.offset == 300 for c in caches)


def test_row_buffer_grows_in_steps_without_copying_each_append():
    buffer = RowBuffer()
    rows = mx.ones((1, 1, 8))
    buffer.append(rows)
    first = buffer.data
    for _ in range(RowBuffer.step - 1):
        buffer.append(rows)
    assert buffer.data.shape[1] == RowBuffer.step  # filled in place, no reallocation
    buffer.append(rows)
    assert buffer.data.shape[1] == 2 * RowBuffer.step and buffer.count == RowBuffer.step + 1
    assert first.shape[1] == RowBuffer.step
    np.testing.assert_array_equal(np.array(buffer.rows()), np.ones((1, RowBuffer.step + 1, 8)))


def test_window_ring_keeps_the_last_rows_in_position_order():
    cache = WindowCache(window=4)
    rows = mx.arange(10, dtype=mx.float32).reshape(1, 10, 1)
    cache.window_keys(rows[:, :6])
    cache.advance(6)
    keys = cache.window_keys(rows[:, 6:7])  # ring holds positions 2..5, then the new row 6
    np.testing.assert_array_equal(np.array(keys).reshape(-1), [2, 3, 4, 5, 6])
    cache.advance(1)
    keys = cache.window_keys(rows[:, 7:])
    np.testing.assert_array_equal(np.array(keys).reshape(-1), [3, 4, 5, 6, 7, 8, 9])


@pytest.mark.parametrize("split", [1, 3, 130])
def test_state_round_trip_is_independent_of_the_live_cache(model, split):
    ids = random_ids(140, model.args.vocab_size, seed=2)
    caches = model.make_cache()
    model(ids[:, :split], caches)
    states = [c.state for c in caches]
    before = [np.array(a.astype(mx.float32)) for s in states for a in _leaves(s)]
    model(ids[:, split:], caches)  # writes into the live caches in place
    after = [np.array(a.astype(mx.float32)) for s in states for a in _leaves(s)]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    if isinstance(tree, mx.array):
        return [tree]
    return [leaf for item in tree for leaf in _leaves(item)]


def _pending_ops(arrays, tmp_path) -> int:
    """How many unevaluated operations the arrays still hang on."""
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), *arrays)
    return path.read_text().count("shape=rectangle")


def test_decode_leaves_no_lazy_graph_in_the_caches(model, tmp_path, monkeypatch):
    ids = random_ids(40, model.args.vocab_size, seed=4)
    caches = model.make_cache()
    mx.eval(model(ids[:, :10], caches))
    for p in range(10, 20):
        mx.eval(model(ids[:, p : p + 1], caches))  # the logits only, as a generate loop does
        mx.synchronize()
        assert _pending_ops([a for c in caches for a in c.arrays()], tmp_path) == 0
    # control: without the per-step evaluation the compressor states keep growing graphs
    monkeypatch.setattr("ds4_mlx.model.evaluate_caches", lambda caches: None)
    for p in range(20, 24):
        mx.eval(model(ids[:, p : p + 1], caches))
    assert _pending_ops([a for c in caches for a in c.arrays()], tmp_path) > 0
