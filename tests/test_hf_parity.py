"""Our model against HF transformers' DeepseekV4ForCausalLM (tests/hf_reference.py), both float32.

HF does not simulate the official code's KV FP8 round trip nor the indexer's Hadamard + FP4
step, so those are switched off on our side where they would change the result: the KV FP8
round trip always, the indexer's QAT when the indexer actually chooses (index_topk below the
number of compressed entries). Measured max|dlogit|: about 1e-5 in every setting below.
"""

import numpy as np
import pytest
import torch

import hf_reference as H
from conftest import load_fp32, random_ids, run_chunks
from testdata import OFFICIAL_B

LENGTH = 300


@pytest.fixture(autouse=True)
def one_torch_thread():
    # the models are tiny; two threads on a shared 2-core machine are slower than one
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _compare(checkpoint, converted, vocab, **settings):
    ids = random_ids(LENGTH, vocab, seed=5)
    hf = H.load_hf_model(checkpoint, index_topk=settings["index_topk"])
    ours = load_fp32(converted, kv_fp8=False, **settings)
    hf_ids = np.array(ids[0])
    assert np.abs(run_chunks(ours, ids, [LENGTH]) - H.hf_prefill_logits(hf, hf_ids)).max() <= 1e-3
    decode = run_chunks(ours, ids, [5])[4:]
    assert np.abs(decode - H.hf_decode_logits(hf, hf_ids, prefill=5)).max() <= 1e-3


def test_every_layer_kind_with_all_compressed_entries(small_checkpoint, small_native):
    # 300 tokens -> 75 CSA entries <= index_topk: the indexer (with its FP4 step) takes them all
    _compare(small_checkpoint, small_native, 512, index_topk=100)


def test_every_layer_kind_with_the_indexer_choosing(small_checkpoint, small_native):
    _compare(small_checkpoint, small_native, 512, index_topk=8, indexer_fp4=False)


def test_official_b_weights(official_b_native):
    # window 128 (wraps after 128 of the 300 tokens), 3 hash layers, two CSA and two HCA layers
    _compare(OFFICIAL_B / "checkpoint", official_b_native, 768, index_topk=1000)
