"""Tests of `ds4-mlx convert`: layout, losslessness against an independent numpy dequantization, errors, CLI."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ds4_mlx.cli import app
from ds4_mlx.convert import RECIPES, CheckpointError, convert
from ds4_mlx.convert import converter
from official_checkpoint import write_official_checkpoint
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


def test_quantizing_recipe_slots_in(tmp_path, monkeypatch):
    def q4(group):
        if group.role == "expert":
            return {"group_size": 32, "bits": 4, "mode": "affine"}
        return {"group_size": 32, "bits": 8, "mode": "affine"} if group.role in ("linear", "wo_a", "head") else None

    monkeypatch.setitem(RECIPES, "q4", q4)
    ckpt = write_official_checkpoint(tmp_path / "ckpt", SMALL, n_shards=1)
    convert(ckpt, tmp_path / "out", recipe="q4")
    w = load_mlx(tmp_path / "out")
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quant["layers.0.ffn.experts.w2"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert quant["head"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert w["layers.0.ffn.experts.w2.weight"].shape == (4, 320, 8)
    assert w["layers.0.ffn.experts.w2.biases"].shape == (4, 320, 2)
    assert w["layers.0.attn.wo_a.weight"].shape == (2, 64, 32)


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
    load_group = converter.load_group

    def failing(ckpt, group, o_groups):
        calls.append(group.name)
        if len(calls) == 100:
            raise CheckpointError(f"tensor {group.name}: simulated read failure")
        return load_group(ckpt, group, o_groups)

    monkeypatch.setattr(converter, "load_group", failing)
    with pytest.raises(CheckpointError, match="simulated"):
        convert(OFFICIAL_B, tmp_path / "out", max_shard_bytes=1 << 20)
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
