"""Tests of `ds4-mlx convert`: layout, losslessness against an independent numpy dequantization, quantizing
recipes, sizes from the headers, errors, resuming, CLI and Hub."""

import json
import re
import shutil
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import SMALL as CONFTEST_SMALL
from conftest import random_ids
from ds4_mlx import load_model
from ds4_mlx.cli import app
from ds4_mlx.convert import RECIPES, CheckpointError, convert, converter, dry_run, hub
from ds4_mlx.convert import imatrix as imx
from ds4_mlx.convert.recipes import GROUP_SIZE
from ds4_mlx.convert.safetensors_reader import Checkpoint
from official_checkpoint import FLASH_CONFIG, write_official_checkpoint, write_official_headers
from testdata import OFFICIAL_B as OFFICIAL_B_DATA

OFFICIAL_B = OFFICIAL_B_DATA / "checkpoint"
INDEX = "model.safetensors.index.json"

# A second tiny config: 3 layers (window, CSA, HCA) + MTP, one hash layer, dims that are not multiples of 128.
SMALL = {
    "hidden_size": 320,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "head_dim": 128,
    "q_lora_rank": 96,
    "o_groups": 2,
    "o_lora_rank": 64,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "num_hash_layers": 1,
    "index_n_heads": 2,
    "index_head_dim": 64,
    "index_topk": 8,
    "vocab_size": 320,
    "compress_ratios": [0, 4, 128, 0],
}


# ---------------------------------------------------------------- independent reference (torch reader + numpy)


def _e4m3_table() -> np.ndarray:
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)) * np.where(c & 0x80, -1.0, 1.0)
    v[(c & 0x7F) == 0x7F] = np.nan
    return v


E4M3 = _e4m3_table()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _raw(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8):
        return t.view(torch.uint8).numpy()
    if t.dtype == torch.bfloat16:
        return (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return t.numpy()


def _official_dequant(t: torch.Tensor, scale: np.ndarray) -> np.ndarray:
    """Official dequantization: FP8 x 2^(e-127) per 128x128 block, FP4 (low nibble first) x 2^(e-127) per 1x32."""
    b = _raw(t)
    if t.dtype == torch.float8_e4m3fn:
        out, inp = b.shape
        exp = np.repeat(np.repeat(scale.astype(np.int32), 128, 0), 128, 1)[:out, :inp]
        return (E4M3[b] * 2.0 ** (exp - 127)).astype(np.float32)
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)
    return (E2M1[codes] * 2.0 ** (np.repeat(scale.astype(np.int32), 32, 1) - 127)).astype(np.float32)


MX_DTYPES = {torch.bfloat16: mx.bfloat16, torch.float32: mx.float32, torch.int64: mx.int32}


def reference_outputs(ckpt: Path, o_groups: int) -> dict:
    """{MLX output name: (official value as float32/int array, "mxfp8" | "mxfp4" | None, MLX dtype)}."""
    raw = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    out, experts = {}, {}
    for name, t in raw.items():
        if name.endswith(".scale"):
            continue
        scale = raw.get(name.removesuffix(".weight") + ".scale")
        if scale is None:
            value, mode, dtype = _raw(t), None, MX_DTYPES[t.dtype]
        else:
            value = _official_dequant(t, _raw(scale))
            mode, dtype = ("mxfp8" if t.dtype == torch.float8_e4m3fn else "mxfp4"), mx.uint32
        if m := re.match(r"(.*\.experts)\.(\d+)\.(w\d)\.weight$", name):
            experts.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = (value, mode, dtype)
            continue
        if name.endswith("attn.wo_a.weight"):
            value = value.reshape(o_groups, -1, value.shape[-1])
        out[re.sub(r"(hc_(?:attn|ffn|head))_", r"\1.", name)] = (value, mode, dtype)
    for name, by_e in experts.items():
        out[name] = (np.stack([by_e[e][0] for e in sorted(by_e)]), *by_e[0][1:])
    return out


def load_mlx(path: Path) -> dict:
    index = json.loads((path / INDEX).read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(mx.load(str(path / shard)))
    assert set(weights) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in weights.values())
    return weights


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def check_lossless(ckpt: Path, native: Path, bf16: Path):
    """native dequantizes exactly to the official values; bf16 holds them cast to bfloat16."""
    config = json.loads((native / "config.json").read_text())
    quant = config.get("quantization", {})
    ref = reference_outputs(ckpt, config["o_groups"])
    nat, b16 = load_mlx(native), load_mlx(bf16)
    scales = {n.removesuffix("weight") + "scales" for n, (_, mode, _) in ref.items() if mode}
    assert set(nat) == set(ref) | scales
    assert set(b16) == set(ref)
    assert set(quant) - {"group_size", "bits", "mode"} == {n.removesuffix(".scales") for n in scales}
    for name, (value, mode, dtype) in ref.items():
        w, b = nat[name], b16[name]
        assert w.dtype == dtype, name
        if mode:
            bits = 8 if mode == "mxfp8" else 4
            s = nat[name.removesuffix("weight") + "scales"]
            assert s.dtype == mx.uint8 and b.dtype == mx.bfloat16, name
            assert w.shape == (*value.shape[:-1], value.shape[-1] * bits // 32), name
            assert s.shape == (*value.shape[:-1], value.shape[-1] // 32), name
            assert quant[name.removesuffix(".weight")] == {"group_size": 32, "bits": bits, "mode": mode}
            w = mx.dequantize(w, s, group_size=32, bits=bits, mode=mode, dtype=mx.float32)
        else:
            assert b.dtype == dtype, name
        assert w.shape == value.shape, name
        assert np.array_equal(_f32(w), value), name
        assert np.array_equal(_f32(b), _f32(mx.array(value).astype(b.dtype))), name


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def official_b(tmp_path_factory):
    out = tmp_path_factory.mktemp("official_b")
    for recipe in ("native", "bf16"):
        convert(OFFICIAL_B, out / recipe, recipe=recipe)
    return out


def _copy_official_b(tmp_path: Path) -> Path:
    return Path(shutil.copytree(OFFICIAL_B, tmp_path / "ckpt", copy_function=shutil.copyfile))


def randomize_scales(ckpt: Path, seed: int = 0):
    """Overwrite every E8M0 `.scale` tensor in place with random exponents (2^-27 .. 2^12)."""
    rng = np.random.default_rng(seed)
    for shard in ckpt.glob("*.safetensors"):
        blob = bytearray(shard.read_bytes())
        n = int.from_bytes(blob[:8], "little")
        for name, h in json.loads(blob[8 : 8 + n]).items():
            if name.endswith(".scale"):
                begin, end = h["data_offsets"]
                blob[8 + n + begin : 8 + n + end] = rng.integers(100, 140, end - begin, dtype=np.uint8).tobytes()
        shard.write_bytes(bytes(blob))


def rewrite_header(path: Path, edit):
    """Apply `edit` to the JSON header of a safetensors file, keeping the data bytes."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])


# ---------------------------------------------------------------- the random checkpoint writer


def test_writer_matches_official_layout(tmp_path):
    config = json.loads((OFFICIAL_B / "config.json").read_text())
    out = write_official_checkpoint(tmp_path, config, n_shards=3)
    for shard in sorted(OFFICIAL_B.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            assert list(a.keys()) == list(b.keys())
            for k in a.keys():
                sa, sb = a.get_slice(k), b.get_slice(k)
                assert (sa.get_dtype(), sa.get_shape()) == (sb.get_dtype(), sb.get_shape()), k
        assert shard.stat().st_size == (out / shard.name).stat().st_size
    assert json.loads((out / INDEX).read_text()) == json.loads((OFFICIAL_B / INDEX).read_text())
    assert json.loads((out / "config.json").read_text()) == config


# ---------------------------------------------------------------- official-b


def test_official_b_layout(official_b):
    nat, b16 = load_mlx(official_b / "native"), load_mlx(official_b / "bf16")
    for name, shape, dtype in [
        ("embed.weight", (768, 384), mx.bfloat16),
        ("hc_head.fn", (4, 1536), mx.float32),
        ("layers.0.hc_attn.base", (24,), mx.float32),
        ("layers.0.ffn.gate.tid2eid", (768, 3), mx.int32),
        ("layers.3.ffn.gate.bias", (5,), mx.float32),
        ("layers.2.attn.wq_a.weight", (128, 96), mx.uint32),
        ("layers.2.attn.wq_a.scales", (128, 12), mx.uint8),
        ("layers.2.attn.wo_a.weight", (4, 128, 32), mx.uint32),
        ("layers.2.attn.wo_a.scales", (4, 128, 4), mx.uint8),
        ("layers.2.attn.indexer.wq_b.weight", (512, 32), mx.uint32),
        ("layers.3.attn.compressor.ape", (128, 128), mx.float32),
        ("layers.4.ffn.experts.w1.weight", (5, 128, 48), mx.uint32),
        ("layers.4.ffn.experts.w2.scales", (5, 384, 4), mx.uint8),
        ("layers.4.ffn.shared_experts.w2.weight", (384, 32), mx.uint32),
        ("mtp.0.e_proj.weight", (384, 96), mx.uint32),
        ("mtp.0.hc_head.scale", (1,), mx.float32),
    ]:
        assert (nat[name].shape, nat[name].dtype) == (shape, dtype), name
    assert b16["layers.2.attn.wo_a.weight"].shape == (4, 128, 128)
    assert b16["layers.4.ffn.experts.w2.weight"].shape == (5, 384, 128)
    assert not any(k.endswith(".scales") for k in b16)

    source = json.loads((OFFICIAL_B / "config.json").read_text())
    for recipe in ("native", "bf16"):
        config = json.loads((official_b / recipe / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["ds4_mlx"] == {"recipe": recipe, "format_version": 1}
        assert {k: v for k, v in config.items() if k not in ("quantization", "ds4_mlx")} == {
            k: v for k, v in source.items() if k != "quantization_config"
        }
    quant = json.loads((official_b / "native" / "config.json").read_text())["quantization"]
    assert {k: quant[k] for k in ("group_size", "bits", "mode")} == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert quant["layers.2.ffn.experts.w1"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert quant["mtp.0.h_proj"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert "quantization" not in json.loads((official_b / "bf16" / "config.json").read_text())
    index = json.loads((official_b / "native" / INDEX).read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    _, meta = mx.load(str(official_b / "native" / "model-00001-of-00001.safetensors"), return_metadata=True)
    assert meta == {"format": "mlx"}


def test_official_b_lossless(official_b):
    check_lossless(OFFICIAL_B, official_b / "native", official_b / "bf16")


# ---------------------------------------------------------------- random checkpoints


def test_random_checkpoint(tmp_path):
    ckpt = write_official_checkpoint(tmp_path / "ckpt", SMALL, seed=3, n_shards=2)
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "tokenizer_config.json").write_text("{}")
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    (ckpt / "encoding").mkdir()
    (ckpt / "encoding" / "encoding_dsv4.py").write_text("")
    for recipe in ("native", "bf16"):
        convert(ckpt, tmp_path / recipe, recipe=recipe, max_shard_bytes=256 << 10)
    check_lossless(ckpt, tmp_path / "native", tmp_path / "bf16")
    index = json.loads((tmp_path / "native" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert all((tmp_path / "native" / s).stat().st_size < (256 << 10) + 4096 for s in shards[:-1])
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "encoding/encoding_dsv4.py"):
        assert (tmp_path / "bf16" / f).is_file()
    native = load_mlx(tmp_path / "native")
    assert "layers.1.attn.indexer.wq_b.weight" in native and "layers.2.attn.indexer.wq_b.weight" not in native
    assert "layers.0.ffn.gate.tid2eid" in native and "layers.1.ffn.gate.bias" in native

    # A BF16 checkpoint (same seed) holds exactly the dequantized weights: both recipes keep it as is.
    b16_ckpt = write_official_checkpoint(tmp_path / "ckpt_bf16", SMALL, seed=3, n_shards=2, bf16=True)
    convert(b16_ckpt, tmp_path / "from_bf16", recipe="native")
    a, b = load_mlx(tmp_path / "bf16"), load_mlx(tmp_path / "from_bf16")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert "quantization" not in json.loads((tmp_path / "from_bf16" / "config.json").read_text())


def test_lossless_with_varied_scales(tmp_path):
    """Every scale byte random, so a wrong block expansion or layout cannot go unnoticed."""
    ckpt = write_official_checkpoint(tmp_path / "ckpt", SMALL, seed=1, n_shards=2)
    randomize_scales(ckpt)
    for recipe in ("native", "bf16"):
        convert(ckpt, tmp_path / recipe, recipe=recipe)
    check_lossless(ckpt, tmp_path / "native", tmp_path / "bf16")


def test_random_checkpoint_without_mtp(tmp_path):
    ckpt = write_official_checkpoint(tmp_path / "ckpt", SMALL, n_shards=1, with_mtp=False)
    convert(ckpt, tmp_path / "out")
    assert not any(k.startswith("mtp.") for k in load_mlx(tmp_path / "out"))


def test_group_size_must_divide_the_inputs(tmp_path):
    """q2's routed experts default to groups of 128 inputs; SMALL's hidden size 320 needs --group-size 64."""
    ckpt = write_official_checkpoint(tmp_path / "ckpt", SMALL, n_shards=1)
    with pytest.raises(ValueError, match="group size 128 does not divide the input size 320 of layers.0.ffn.experts.w1"):
        convert(ckpt, tmp_path / "out", recipe="q2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(ValueError, match="--group-size applies to q2 and q4"):
        convert(ckpt, tmp_path / "out", recipe="native", group_size=64)
    convert(ckpt, tmp_path / "out", recipe="q2", group_size=64)
    w = load_mlx(tmp_path / "out")
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quant["layers.0.ffn.experts.w2"] == {"group_size": 64, "bits": 2, "mode": "affine"}
    assert w["layers.0.ffn.experts.w1.weight"].shape == (4, 64, 320 * 2 // 32)
    assert w["layers.0.ffn.experts.w1.biases"].shape == (4, 64, 5)


# ---------------------------------------------------------------- errors and atomic output


def _assert_nothing_published(out: Path):
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert not (partial / "config.json").exists()


def _truncate(ckpt):
    shard = ckpt / "model-00002-of-00003.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    return "model-00002-of-00003.safetensors", "layers."


def _wrong_dtype(ckpt):
    def edit(header):
        header["layers.0.attn.wq_a.weight"]["dtype"] = "I8"

    rewrite_header(ckpt / "model-00001-of-00003.safetensors", edit)
    return "model-00001-of-00003.safetensors", "layers.0.attn.wq_a.weight"


def _missing_from_shard(ckpt):
    rewrite_header(ckpt / "model-00002-of-00003.safetensors", lambda h: h.pop("layers.3.ffn.gate.bias"))
    return "model-00002-of-00003.safetensors", "layers.3.ffn.gate.bias"


def _missing_everywhere(ckpt):
    rewrite_header(ckpt / "model-00002-of-00003.safetensors", lambda h: h.pop("layers.3.ffn.gate.bias"))
    index = json.loads((ckpt / INDEX).read_text())
    del index["weight_map"]["layers.3.ffn.gate.bias"]
    (ckpt / INDEX).write_text(json.dumps(index))
    return INDEX, "layers.3.ffn.gate.bias"


def _missing_shard(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"]["layers.3.attn.wkv.weight"] = "model-00009-of-00003.safetensors"
    (ckpt / INDEX).write_text(json.dumps(index))
    return "model-00009-of-00003.safetensors", "layers.3.attn.wkv.weight"


@pytest.mark.parametrize("corrupt", [_truncate, _wrong_dtype, _missing_from_shard, _missing_everywhere, _missing_shard])
def test_corrupt_checkpoint(tmp_path, corrupt):
    ckpt = _copy_official_b(tmp_path)
    shard, tensor = corrupt(ckpt)
    with pytest.raises(CheckpointError) as e:
        convert(ckpt, tmp_path / "out")
    assert shard in str(e.value) and tensor in str(e.value)
    _assert_nothing_published(tmp_path / "out")


def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    produce = converter.produce

    def failing(ckpt, step, importance=None):
        calls.append(step.group.name)
        if len(calls) == 100:
            raise CheckpointError(f"tensor {step.group.name}: simulated read failure")
        return produce(ckpt, step, importance)

    monkeypatch.setattr(converter, "produce", failing)
    with pytest.raises(CheckpointError, match="simulated"):
        convert(OFFICIAL_B, tmp_path / "out", recipe="q2", max_shard_bytes=1 << 20)
    _assert_nothing_published(tmp_path / "out")


def test_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert(OFFICIAL_B, out)
    assert (out / "keep.txt").exists()
    convert(OFFICIAL_B, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not out.with_name("out.partial").exists()


# ---------------------------------------------------------------- CLI


def test_cli_convert(tmp_path):
    runner = CliRunner()
    args = ["convert", "--hf-path", str(OFFICIAL_B), "--mlx-path", str(tmp_path / "out"), "--recipe", "bf16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "tokenizer.json" in result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["ds4_mlx"]["recipe"] == "bf16"

    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--force" in again.stderr

    bad = runner.invoke(app, ["convert", "--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "x")])
    assert bad.exit_code != 0
    assert "no config.json" in bad.stderr and "Traceback" not in bad.output
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- quantizing recipes


def _rtn(recipe, group, group_size=None):
    target = RECIPES[recipe](group, group_size or GROUP_SIZE[recipe])
    return {**target, "rtn": True} if isinstance(target, dict) else target


def _log_probs(path: Path, ids: mx.array) -> mx.array:
    model = load_model(path)
    model.set_dtype(mx.float32)
    logits = model(ids)[0]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _expert_weights(path: Path, name: str) -> mx.array:
    quant = json.loads((path / "config.json").read_text())["quantization"][name]
    w = load_mlx(path)
    scales = w[name + ".scales"]
    biases = w[name + ".biases"].astype(mx.float32) if name + ".biases" in w else None
    scales = scales.astype(mx.float32) if biases is not None else scales
    return mx.dequantize(w[name + ".weight"], scales, biases, dtype=mx.float32, **quant)


def test_quantized_recipes(small_checkpoint, small_native, tmp_path, monkeypatch):
    """q2 and q4 write MLX affine experts (several shards), load, and give logits close to native; our
    quantization beats round to nearest on the converted tensors and on the KL of the logits."""
    monkeypatch.setitem(RECIPES, "q2_rtn", partial(_rtn, "q2"))
    monkeypatch.setitem(RECIPES, "q4_rtn", partial(_rtn, "q4"))
    ids = random_ids(128, 512)
    reference = _log_probs(small_native, ids)
    kl, errors = {}, {}
    for recipe in ("q2", "q2_rtn", "q4", "q4_rtn"):
        out = tmp_path / recipe
        summary = convert(small_checkpoint, out, recipe=recipe, max_shard_bytes=1 << 20)
        index = json.loads((out / INDEX).read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert summary["total_bytes"] == index["metadata"]["total_size"]
        lp = _log_probs(out, ids)
        kl[recipe] = mx.mean(mx.sum(mx.exp(reference) * (reference - lp), axis=-1)).item()
        native = _expert_weights(small_native, "layers.2.ffn.experts.w2")
        ours = _expert_weights(out, "layers.2.ffn.experts.w2")
        errors[recipe] = (mx.linalg.norm(ours - native) / mx.linalg.norm(native)).item()

    quant = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization"]
    assert quant["layers.1.ffn.experts.w3"] == {"group_size": 128, "bits": 2, "mode": "affine"}
    assert quant["mtp.0.ffn.experts.w1"] == {"group_size": 128, "bits": 2, "mode": "affine"}
    assert quant["head"] == quant["embed"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert quant["layers.2.attn.wq_b"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert quant["layers.1.attn.indexer.wq_b"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert "layers.2.attn.compressor.wkv" not in quant and "layers.2.ffn.gate" not in quant
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["layers.0.ffn.experts.w2"] == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    # Measured (random weights make the model far more sensitive than a trained one): KL q2 0.61
    # (round to nearest 0.85), q4 0.037 (0.070); relative weight error q2 0.46 (0.58), q4 0.09 (0.11).
    assert kl["q2"] < 0.8 * kl["q2_rtn"] and kl["q2"] < 0.9, kl
    assert kl["q4"] < 0.8 * kl["q4_rtn"] and kl["q4"] < 0.08, kl
    assert errors["q2"] < 0.85 * errors["q2_rtn"] and errors["q4"] < 0.9 * errors["q4_rtn"], errors


def test_imatrix_weights_the_error(tmp_path):
    """With --imatrix the routed experts' error weighted by the input statistics goes down (heavy-tailed
    checkpoint: its ffn_norm weights give the MoE input outlier channels)."""
    ckpt = write_official_checkpoint(tmp_path / "ckpt", CONFTEST_SMALL, seed=2, n_shards=1, heavy_tailed=True)
    convert(ckpt, tmp_path / "native")
    ids = [list(map(int, np.random.default_rng(5).integers(2, 512, 256)))]
    stats, tokens = imx.collect(load_model(tmp_path / "native"), ids)
    imx.save(tmp_path / "imatrix.safetensors", stats, tokens)
    convert(ckpt, tmp_path / "plain", recipe="q2")
    convert(ckpt, tmp_path / "weighted", recipe="q2", imatrix=tmp_path / "imatrix.safetensors")
    # Measured: weighted error ratios 0.83 (w1, w3: input with outlier channels), 0.96 (w2).
    for proj, key, ratio in (("w1", "w1", 0.9), ("w3", "w1", 0.9), ("w2", "w2", 0.99)):
        name = f"layers.3.ffn.experts.{proj}"
        native = _expert_weights(tmp_path / "native", name)
        sums, counts = (np.array(stats["layers.3.ffn.experts"][k]) for k in (key, "counts"))
        importance = mx.array(sums / np.maximum(counts, 1)[:, None])[:, None, :]  # [E, 1, in]
        plain, weighted = (mx.sum(importance * (_expert_weights(tmp_path / run, name) - native) ** 2).item()
                           for run in ("plain", "weighted"))
        assert weighted < ratio * plain, proj

    # Statistics of another model: refused before anything is written.
    imx.save(tmp_path / "other.safetensors", {m: {**d, "w1": d["w1"][:, :100]} for m, d in stats.items()}, tokens)
    with pytest.raises(ValueError, match="collected on another model"):
        convert(ckpt, tmp_path / "bad", recipe="q2", imatrix=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an imatrix file"):
        convert(ckpt, tmp_path / "bad", recipe="q2", imatrix=ckpt / "config.json")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


# ---------------------------------------------------------------- sizes from the headers (--dry-run)


def test_dry_run_reads_no_tensor_data(official_b, monkeypatch):
    def no_reading(self, name, out=None):
        raise AssertionError(f"tensor data read: {name}")

    monkeypatch.setattr(Checkpoint, "read", no_reading)
    for recipe in ("native", "bf16", "q2", "q4"):
        summary = dry_run(OFFICIAL_B, recipe)
        assert summary["total_bytes"] == sum(c["bytes"] for c in summary["classes"].values())
        if recipe in ("native", "bf16"):
            index = json.loads((official_b / recipe / INDEX).read_text())
            assert summary["total_bytes"] == index["metadata"]["total_size"]
    result = CliRunner().invoke(app, ["convert", "--hf-path", str(OFFICIAL_B), "--recipe", "q2", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["total_bytes"] == dry_run(OFFICIAL_B, "q2")["total_bytes"]
    assert summary["classes"]["routed experts"]["bits_per_weight"] == 2.25
    assert summary["classes"]["attention"]["bits_per_weight"] == pytest.approx(8.25, abs=0.01)


def test_flash_sizes(tmp_path):
    """Flash-sized headers (46 sparse shards, no data): q2 fits within ds4's q2 GGUF (80.76 GiB, without MTP)."""
    headers = write_official_headers(tmp_path / "flash", FLASH_CONFIG)
    native, q2 = dry_run(headers, "native"), dry_run(headers, "q2")
    assert native["total_bytes"] == pytest.approx(159.8e9, rel=1e-3)
    assert q2["classes"]["routed experts"]["params"] == 256 * 43 * 3 * 2048 * 4096
    assert q2["classes"]["routed experts"]["bits_per_weight"] == 2.25
    assert q2["main_bytes"] <= 80.76 * 2**30 and q2["total_bytes"] == pytest.approx(87.93e9, rel=1e-3)


# ---------------------------------------------------------------- resuming


def _interrupt_after(monkeypatch, n_shards: int):
    """Make the conversion raise KeyboardInterrupt when it starts shard n_shards + 1."""
    write_shard, written = converter._write_shard, []

    def interrupted(ckpt, path, *args):
        if len(written) == n_shards:
            raise KeyboardInterrupt
        written.append(path.name)
        return write_shard(ckpt, path, *args)

    monkeypatch.setattr(converter, "_write_shard", interrupted)
    return written


def test_resume_after_interruption(tmp_path, monkeypatch):
    options = {"recipe": "q2", "max_shard_bytes": 1 << 20}
    convert(OFFICIAL_B, tmp_path / "ref", **options)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            convert(OFFICIAL_B, out, **options)
    assert not out.exists() and not (partial / "config.json").exists()
    manifest = json.loads((partial / "ds4-convert-manifest.json").read_text())
    first, second = sorted(manifest["shards"])
    # A damaged finished shard is redone, an intact one kept.
    with open(partial / second, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with monkeypatch.context() as m:
        written = _interrupt_after(m, 100)
        convert(OFFICIAL_B, out, **options)
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files and not partial.exists()
    assert first not in written and second in written
    for name in ref_files:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    # Other options: the leftovers are discarded.
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            convert(OFFICIAL_B, tmp_path / "other", **options)
    with monkeypatch.context() as m:
        written = _interrupt_after(m, 100)
        convert(OFFICIAL_B, tmp_path / "other", recipe="q4", max_shard_bytes=1 << 20)
    assert json.loads((tmp_path / "other" / "config.json").read_text())["ds4_mlx"]["recipe"] == "q4"
    assert written[0] == "model-00001-of-%05d.safetensors" % len(written)


# ---------------------------------------------------------------- Hugging Face Hub


def test_repo_id_is_downloaded(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(OFFICIAL_B)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    args = ["convert", "--hf-path", "deepseek-ai/DeepSeek-V4-Flash", "--mlx-path", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls[0][0] == "deepseek-ai/DeepSeek-V4-Flash"
    assert {"config.json", INDEX, "*.safetensors", "tokenizer.json"} <= set(calls[0][1])
    assert (tmp_path / "out" / "config.json").is_file()


def test_offline_hub_says_to_pass_a_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    args = ["convert", "--hf-path", "deepseek-ai/DeepSeek-V4-Flash", "--mlx-path", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "deepseek-ai/DeepSeek-V4-Flash" in result.stderr and "local directory as --hf-path" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_upload(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def upload_large_folder(self, **kwargs):
            calls.append(("upload", kwargs))
            assert (Path(kwargs["folder_path"]) / "config.json").is_file()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    args = ["convert", "--hf-path", str(OFFICIAL_B), "--mlx-path", str(tmp_path / "out"), "--upload-repo", "me/ds4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [("create_repo", {"repo_id": "me/ds4", "exist_ok": True}),
                     ("upload", {"folder_path": str(tmp_path / "out"), "repo_id": "me/ds4", "repo_type": "model"})]
