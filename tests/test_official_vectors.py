"""Our model, converted losslessly (native recipe), against logits of DeepSeek's official code.

tests/data/official-b/README.md explains the arrays and the official code's own noise: in its
bf16 mode it agrees with itself to a median max|dlogit| of 0.08 (97% argmax); in its FP8 path
(FP8 activations before every FP8/FP4 linear) to 0.52-0.57 (82-87%). HF transformers lands at
0.08 / 97% and 0.6 / 85%. Our thresholds are the issue's; the measured values are in comments.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import logit_stats, run_chunks

from ds4_mlx import load_model
from ds4_mlx.layers.attention import Attention


class Runs:
    """Each model run once per length (CPU time is the suite's budget), with the indexer's
    choices recorded: {layer: {query position: set of chosen compressed rows}}."""

    def __init__(self, model, vectors):
        self.model, self.vectors, self.memo = model, vectors, {}
        self.owners = {id(layer.attn): i for i, layer in enumerate(model.layers) if layer.attn.ratio == 4}
        self.choices = {}

    def ids(self, length):
        return mx.array(self.vectors[f"ids_L{length}"])[None]

    def _record(self, select):
        def spy(attn, iq, iw, index_keys, first):
            picks, valid = select(attn, iq, iw, index_keys, first)
            layer = self.choices.setdefault(self.owners[id(attn)], {})
            rows = np.array(picks)[0]
            ok_rows = np.ones(rows.shape, dtype=bool) if valid is None else np.array(valid)[0]
            for j, (row, ok) in enumerate(zip(rows, ok_rows)):
                layer[first + j] = set(row[ok].tolist())
            return picks, valid
        return spy

    def _run(self, key, compute):
        if key not in self.memo:
            self.choices = {}
            select = Attention._select
            Attention._select = self._record(select)
            try:
                self.memo[key] = compute(), self.choices
            finally:
                Attention._select = select
        return self.memo[key]

    def prefill(self, length):
        """(pre-head streams [1, L, hc, dim], logits [L, V]), indexer choices."""
        def compute():
            streams = self.model.hidden(self.ids(length), self.model.make_cache())
            return streams, np.array(self.model.logits(streams))[0]
        return self._run(("prefill", length), compute)

    def decode(self, length):
        """The official generate.py path: prefill 5 tokens, then one per call; rows = positions 4.."""
        return self._run(("decode", length), lambda: run_chunks(self.model, self.ids(length), [5])[4:])


@pytest.fixture(scope="module")
def runs(official_b_native, official_vectors):
    return Runs(load_model(official_b_native), official_vectors)


@pytest.fixture(scope="module")
def fp8_runs(official_b_native, official_vectors):
    return Runs(load_model(official_b_native, model_config={"fp8_activations": True}), official_vectors)


@pytest.mark.parametrize("length", [42, 299, 701])
def test_prefill_last_matches_official_bf16_mode(runs, official_vectors, length):
    # measured: 0.083 (42), 0.090 (299)
    (_, logits), _ = runs.prefill(length)
    delta = np.abs(logits[-1] - official_vectors[f"bf16mode_prefill_last_logits_L{length}"]).max()
    assert delta <= 0.3


def test_decode_matches_official_bf16_mode(runs, official_vectors):
    # measured: median 0.082, p90 0.108, argmax 98.0%
    logits, _ = runs.decode(299)
    median, _, _, agree = logit_stats(logits, official_vectors["bf16mode_decode_logits_L299"])
    assert median <= 0.15 and agree >= 0.95, (median, agree)


@pytest.mark.parametrize("length", [42, 299])
def test_decode_matches_official_fp8_path(runs, official_vectors, length):
    # measured: L42 median 0.612 argmax 84.2%; L299 median 0.613 argmax 83.4%
    logits, _ = runs.decode(length)
    median, _, _, agree = logit_stats(logits, official_vectors[f"decode_logits_L{length}"])
    assert median <= 0.9 and agree >= 0.78, (median, agree)


@pytest.mark.parametrize("length", [42, 299])
def test_fp8_activation_simulation_moves_toward_the_fp8_path(runs, fp8_runs, official_vectors, length):
    # measured, median max|dlogit| vs decode_logits: L42 0.612 -> 0.362, L299 0.613 -> 0.540
    reference = official_vectors[f"decode_logits_L{length}"]
    plain = logit_stats(runs.decode(length)[0], reference)
    simulated = logit_stats(fp8_runs.decode(length)[0], reference)
    assert simulated[0] < plain[0] and simulated[3] >= 0.8, (plain, simulated)


def test_prefill_at_every_position_matches_official_fp8_path(runs, official_vectors):
    # measured: median 0.598, argmax 83.9%
    (_, logits), _ = runs.prefill(299)
    median, _, _, agree = logit_stats(logits, official_vectors["prefill_all_logits_L299"])
    assert median <= 0.9 and agree >= 0.78, (median, agree)


@pytest.mark.parametrize("length", [42, 299, 701])
def test_mtp_block_matches_official(runs, official_vectors, length):
    # measured max|dlogit| at the last position: 0.76 (42), 0.48 (299), 0.65 (701) -- the FP8-path
    # noise of a single prefill (main model prefill-last vs official FP8: 0.54-0.70)
    (streams, _), _ = runs.prefill(length)
    next_ids = mx.array(official_vectors[f"mtp_input_ids_L{length}"])[None]
    model = runs.model
    logits = np.array(model.mtp_logits(streams, next_ids, model.make_mtp_cache()))[0, -1]
    assert np.abs(logits - official_vectors[f"mtp_prefill_last_logits_L{length}"]).max() <= 1.0


def _jaccard(choices, reference, first_position):
    """Per-position Jaccard of our sets vs the official top-k rows (-1 = none). Positions where
    our model skipped the indexer (no more visible rows than index_topk) took every visible row."""
    scores = []
    for offset, row in enumerate(reference):
        pos = first_position + offset
        official = {int(w) for w in row if w >= 0}
        ours = choices.get(pos, set(range((pos + 1) // 4)))
        if official or ours:
            scores.append(len(official & ours) / len(official | ours))
    return np.array(scores)


@pytest.mark.parametrize("length", [299, 701])
def test_indexer_choices_match_official_as_sets(runs, official_vectors, length):
    # The official code agrees with itself (prefill vs decode) at mean Jaccard 0.92/0.90 (L299)
    # and 0.84/0.80 (L701). Measured here: prefill 0.907/0.889 and 0.836/0.791, decode
    # 0.909/0.891 and 0.828/0.792 (layers 2/4).
    _, prefill_choices = runs.prefill(length)
    _, decode_choices = runs.decode(length)
    floor = 0.85 if length == 299 else 0.75
    for layer in (2, 4):
        prefill = _jaccard(prefill_choices[layer], official_vectors[f"indexer_topk_prefill_layer{layer}_L{length}"], 0)
        decode = _jaccard(decode_choices[layer], official_vectors[f"indexer_topk_decode_layer{layer}_L{length}"], 5)
        assert prefill.mean() >= floor and decode.mean() >= floor, (layer, prefill.mean(), decode.mean())
        assert prefill.min() >= 0.25 and decode.min() >= 0.25


def test_every_block_matches_official_hidden_state(fp8_runs, official_vectors):
    """Layer by layer, the 42-token prefill: each block's 4 streams vs the official FP8 path's.
    The official code's self-noise is 1-3% relative at block 0 (README); measured here with the
    FP8 activation simulation: 1.4%, 3.4%, 4.7%, 6.6%, 7.5%, 8.5% (without it 3.5% ... 11.4%)."""
    model = fp8_runs.model
    bits = official_vectors["hidden_blocks_bf16bits_L42"]
    reference = (bits.astype(np.uint32) << 16).view(np.float32)
    cache = model.make_cache()
    ids = fp8_runs.ids(42)
    x = model.embed(ids)
    streams = mx.broadcast_to(x[:, :, None], (*x.shape[:2], model.hc_mult, x.shape[-1]))
    for i, layer in enumerate(model.layers):
        streams = layer(streams, cache[i], ids)
        ours = np.array(streams.astype(mx.float32))[0]
        relative = np.linalg.norm(ours - reference[i]) / np.linalg.norm(reference[i])
        assert relative <= (0.02 if i == 0 else 0.12), (i, relative)
