"""The error-minimising affine quantizer and the imatrix statistics."""

import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from ds4_mlx import load_model
from ds4_mlx.cli import app
from ds4_mlx.convert import imatrix as imx
from ds4_mlx.convert.quantize import affine_quantize
from ds4_mlx.convert.layout import TensorSpec
from ds4_mlx.convert.recipes import Group
from ds4_mlx.layers.moe import Gate
from official_checkpoint import quantize_fp4


def fp4_like(rows, cols, seed=0):
    """Heavy-tailed weights rounded to the official FP4 format (as the routed experts are shipped)."""
    w = np.random.default_rng(seed).standard_t(4, (rows, cols)) / np.sqrt(2 * cols)
    return mx.array(quantize_fp4(w)[2].astype(np.float32))


def dequant(packed, group_size, bits):
    w, s, b = packed
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)


def rel_error(x, y, w=1.0):
    return mx.sqrt(mx.sum(w * (x - y) ** 2) / mx.sum(w * x * x)).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_layout_and_exactness(bits, group_size):
    """MLX's own kernels see exactly s * q + b: quantized_matmul on the identity returns the weight."""
    x = fp4_like(96, 256, seed=bits)
    w, s, b = affine_quantize(x, group_size, bits)
    assert w.dtype == mx.uint32 and w.shape == (96, 256 * bits // 32)
    assert s.dtype == b.dtype == mx.bfloat16 and s.shape == b.shape == (96, 256 // group_size)
    eye = mx.eye(256)
    y = mx.quantized_matmul(eye, w, s, b, transpose=True, group_size=group_size, bits=bits).T
    assert mx.array_equal(y, dequant((w, s, b), group_size, bits)).item()


@pytest.mark.parametrize("bits,group_size", [(2, 64), (2, 128), (4, 64), (4, 128), (8, 64)])
def test_beats_round_to_nearest(bits, group_size):
    x = fp4_like(256, 1024)
    importance = mx.array(np.random.default_rng(1).lognormal(0, 1, 1024).astype(np.float32))
    rtn = mx.dequantize(*mx.quantize(x.astype(mx.bfloat16), group_size=group_size, bits=bits),
                        group_size=group_size, bits=bits).astype(mx.float32)
    ours = dequant(affine_quantize(x, group_size, bits), group_size, bits)
    weighted = dequant(affine_quantize(x, group_size, bits, importance), group_size, bits)
    assert rel_error(x, ours) < 0.9 * rel_error(x, rtn)
    assert rel_error(x, weighted, importance) < (0.97 if bits < 8 else 1.0) * rel_error(x, ours, importance)


def test_degenerate_groups():
    """Constant groups come out exact, two-valued ones up to the bfloat16 rounding of the scale, also with
    all-zero importance."""
    x = mx.concatenate([mx.zeros((2, 64)), mx.full((2, 64), 0.375), mx.where(mx.arange(64) % 2 == 0, -1.0, 2.0)[None]])
    for bits in (2, 4, 8):
        for importance in (None, mx.zeros((64,))):
            y = dequant(affine_quantize(x, 64, bits, importance), 64, bits)
            assert mx.array_equal(x[:4], y[:4]).item()
            assert mx.allclose(x[4], y[4], rtol=0, atol=2**-7).item()


# ---------------------------------------------------------------- imatrix


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("imatrix") / "prompts.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(map(str, rng.integers(2, 512, n))) for n in (20, 37)) + "\n\n")
    return path


def test_imatrix_matches_routing(small_native, prompts, monkeypatch):
    """w1 sums = squared MoE inputs of the tokens routed to each expert (captured independently at the
    router); w2 sums recomputed in numpy from the dequantized expert weights; counts = tokens x top-k."""
    seen = {}
    gate_call = Gate.__call__

    def recording_gate(self, x, token_ids):
        weights, indices = gate_call(self, x, token_ids)
        seen.setdefault(id(self), []).append((np.array(x.astype(mx.float32)), np.array(weights), np.array(indices)))
        return weights, indices

    monkeypatch.setattr(Gate, "__call__", recording_gate)
    model = load_model(small_native)
    ids = imx.read_prompts(prompts, tokenizer=None)
    assert [len(p) for p in ids] == [20, 37]
    stats, tokens = imx.collect(model, ids, max_tokens=50, chunk=16)
    assert tokens == 50 and set(stats) == {f"layers.{i}.ffn.experts" for i in range(4)} | {"mtp.0.ffn.experts"}
    args = model.args
    layer = model.layers[3].ffn
    x, weights, indices = (np.concatenate(parts) for parts in zip(*seen[id(layer.gate)]))
    s = {k: np.array(v) for k, v in stats["layers.3.ffn.experts"].items()}
    assert x.shape[0] == 50 and s["counts"].sum() == 50 * args.num_experts_per_tok
    w1 = np.array(mx.dequantize(layer.experts.w1.weight, layer.experts.w1.scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
    w3 = np.array(mx.dequantize(layer.experts.w3.weight, layer.experts.w3.scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
    exp_w1, exp_w2 = np.zeros_like(s["w1"]), np.zeros_like(s["w2"])
    for n, row in enumerate(indices):
        for j, e in enumerate(row):
            gate, up = w1[e] @ x[n], w3[e] @ x[n]
            hidden = gate.clip(max=10) / (1 + np.exp(-gate.clip(max=10))) * up.clip(-10, 10) * weights[n, j]
            exp_w1[e] += x[n] ** 2
            exp_w2[e] += hidden**2
    np.testing.assert_allclose(s["w1"], exp_w1, rtol=1e-4)
    np.testing.assert_allclose(s["w2"], exp_w2, rtol=2e-3, atol=1e-6 * exp_w2.max())
    np.testing.assert_array_equal(s["counts"], np.bincount(indices.ravel(), minlength=args.n_routed_experts))


def test_read_prompts(tmp_path):
    class Tokenizer:
        def encode(self, text):
            return [len(word) for word in text.split()]

    (tmp_path / "p.txt").write_text("3 4 5\nhello big world\n\n7\n")
    (tmp_path / "p.jsonl").write_text('{"text": "a bb"}\n{"text": "ccc"}\n')
    assert imx.read_prompts(tmp_path / "p.txt", Tokenizer) == [[3, 4, 5], [5, 3, 5], [7]]
    assert imx.read_prompts(tmp_path / "p.jsonl", Tokenizer) == [[1, 2], [3]]


def test_expert_importance():
    specs = [TensorSpec(f"layers.0.ffn.experts.{e}.w3.weight", (8, 4), "fp4") for e in range(3)]
    group = Group("layers.0.ffn.experts.w3.weight", "expert", specs)
    sums = np.array([[1.0, 1.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    imatrix = {"layers.0.ffn.experts.w1": sums, "layers.0.ffn.experts.counts": np.array([2.0, 1.0, 0.0])}
    w = imx.expert_importance(imatrix, group)  # w3 reads the w1 statistics (same input)
    np.testing.assert_allclose(w[0], np.array([1.0, 1.0, 2.0, 0.0]) + imx.FLOOR)
    np.testing.assert_allclose(w[1], 1 + imx.FLOOR)
    np.testing.assert_allclose(w[2], 1.0)  # never routed: uniform
    imatrix["layers.0.ffn.experts.w1"] = sums[:, :3]
    with pytest.raises(ValueError, match="another model"):
        imx.expert_importance(imatrix, group)


def test_imatrix_cli(small_native, prompts, tmp_path):
    out = tmp_path / "flash.imatrix"
    args = ["imatrix", "--model", str(small_native), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "30"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded, meta = mx.load(str(out), format="safetensors", return_metadata=True)
    assert loaded["layers.0.ffn.experts.counts"].sum().item() == 30 * 3  # top-3 routing
    assert meta == {"format": imx.FORMAT, "tokens": "30"}
    text = tmp_path / "prompts.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    result = CliRunner().invoke(app, ["imatrix", "--model", str(small_native), "--prompts", str(text), "--out", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "has no tokenizer.json, tokenizer_config.json: text prompts need the tokenizer" in result.stderr
