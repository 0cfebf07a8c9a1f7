"""Write random DeepSeek V4 checkpoints in the exact layout of the official Hugging Face release.

Layout as in /work/shared/testdata/official-b/checkpoint: official names, FP8 projections F8_E4M3 with F8_E8M0
128x128 block scales, routed experts FP4 e2m1 packed two per byte in I8 (low nibble = even input index) with
F8_E8M0 1x32 scales, BF16/F32/I64 for the rest, mtp.0.* in the last shard, index and config.json.
Random init as described in official-b's README (so models built from it give sensible logits); the mHC
biases carry the N(., 0.3) noise measured on official-b.
"""

import json
import math
from pathlib import Path

import numpy as np

from ds4_mlx.convert.layout import checkpoint_tensors, model_args, on_disk_forms, scale_name
from ds4_mlx.convert.safetensors_reader import NP_DTYPES

BASE_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 384,
    "index_head_dim": 128,
    "index_n_heads": 4,
    "index_topk": 24,
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 128,
    "n_routed_experts": 5,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 3,
    "num_hidden_layers": 6,
    "num_hash_layers": 3,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 4,
    "o_lora_rank": 128,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 768,
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 0],
}


def _e4m3_values() -> np.ndarray:
    """Values of the finite non-negative e4m3 codes 0..126."""
    codes = np.arange(127)
    exp, man = codes >> 3, codes & 7
    return np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))


E4M3 = _e4m3_values()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])

# safetensors (torch) orders tensors by dtype, then name.
DTYPE_ORDER = ["I64", "F32", "BF16", "F8_E8M0", "F8_E4M3", "I8"]


def _round_to_codes(x: np.ndarray, table: np.ndarray, sign_bit: int) -> np.ndarray:
    """Round-to-nearest-even onto a sorted table of magnitudes (code = index), sign in `sign_bit`."""
    a = np.abs(x)
    i = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lo, hi = table[i - 1], table[i]
    up = (a - lo > hi - a) | ((a - lo == hi - a) & (i % 2 == 0))
    return (np.where(up, i, i - 1) | ((x < 0) << sign_bit)).astype(np.uint8)


def _decode(codes: np.ndarray, table: np.ndarray, sign_bit: int) -> np.ndarray:
    mag = table[codes & ((1 << sign_bit) - 1)]
    return np.where(codes >> sign_bit, -mag, mag)


def _exponents(amax: np.ndarray, qmax: float) -> np.ndarray:
    """Power-of-two scale exponents 2^ceil(log2(amax / qmax)), amax floored at 1e-4."""
    return np.ceil(np.log2(np.maximum(amax, 1e-4) / qmax)).astype(np.int32)


def quantize_fp8(w: np.ndarray):
    """[out, in] float -> (e4m3 codes [out, in], E8M0 exponent bytes [ceil(out/128), ceil(in/128)], dequantized)."""
    out, inp = w.shape
    nb_o, nb_i = -(-out // 128), -(-inp // 128)
    blocks = np.zeros((nb_o * 128, nb_i * 128))
    blocks[:out, :inp] = w
    blocks = blocks.reshape(nb_o, 128, nb_i, 128)
    e = _exponents(np.abs(blocks).max(axis=(1, 3)), 448.0)
    scale = np.ldexp(1.0, e)[:, None, :, None]
    codes = _round_to_codes(blocks / scale, E4M3, 7)
    deq = _decode(codes, E4M3, 7) * scale
    crop = (slice(0, out), slice(0, inp))
    return codes.reshape(nb_o * 128, -1)[crop], (e + 127).astype(np.uint8), deq.reshape(nb_o * 128, -1)[crop]


def quantize_fp4(w: np.ndarray):
    """[out, in] float -> (packed I8 [out, in/2] low nibble first, E8M0 bytes [out, in/32], dequantized)."""
    out, inp = w.shape
    groups = w.reshape(out, inp // 32, 32)
    e = _exponents(np.abs(groups).max(axis=-1), 6.0)
    scale = np.ldexp(1.0, e)[..., None]
    codes = _round_to_codes(groups / scale, E2M1, 3).reshape(out, inp)
    deq = (_decode(codes.reshape(out, -1, 32), E2M1, 3) * scale).reshape(out, inp)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
    return packed, (e + 127).astype(np.uint8), deq


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (round to nearest even)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _gain(name: str) -> float:
    if name.endswith(("w1.weight", "w3.weight")) and "experts" in name:
        return 3.5
    if name.endswith("w2.weight") and "experts" in name:
        return 0.1
    return 0.5 if name.endswith("wo_b.weight") else 1.0


def _hc_base(n: int, hc: int, rng) -> np.ndarray:
    """mHC biases: pre ~ N(-1, 0.3), post ~ N(0, 0.3), comb ~ N(0, 1) (hc_head has pre only)."""
    pre = rng.normal(-1, 0.3, hc)
    if n == hc:
        return pre
    return np.concatenate([pre, rng.normal(0, 0.3, hc), rng.normal(0, 1, hc * hc)])


def _float_values(spec, args, rng) -> np.ndarray:
    name, shape = spec.name, spec.shape
    if name == "embed.weight":
        return rng.normal(0, 1, shape)
    if name == "head.weight":
        return rng.normal(0, 2 / math.sqrt(args.hidden_size), shape)
    if name.endswith("norm.weight"):
        return 1 + rng.normal(0, 0.1, shape)
    if name.endswith("attn_sink"):
        return rng.normal(4, 1, shape)
    if name.endswith("ape"):
        return rng.normal(0, 0.5, shape)
    if name.endswith("gate.bias"):
        return rng.normal(0, 1, shape)
    if name.endswith("_base"):
        return _hc_base(shape[0], args.hc_mult, rng)
    if name.endswith("_scale"):
        return rng.uniform(0.3, 1, shape)
    return rng.normal(0, 1 / math.sqrt(shape[-1]), shape)  # linears and hc fn


def _tensors(spec, args, rng, bf16: bool, heavy_tailed: bool = False) -> dict:
    """{name: (safetensors dtype, numpy array of the raw values)} for one spec."""
    if spec.kind == "I64":
        ids = np.argsort(rng.random((args.vocab_size, args.n_routed_experts)), axis=1)
        return {spec.name: ("I64", ids[:, : args.num_experts_per_tok].astype(np.int64))}
    if heavy_tailed and spec.name.endswith("ffn_norm.weight"):  # outlier channels in the MoE input
        return {spec.name: ("BF16", bf16_bits(rng.lognormal(0, 0.7, spec.shape)))}
    if spec.kind in ("BF16", "F32"):
        x = _float_values(spec, args, rng)
        return {spec.name: ("BF16", bf16_bits(x)) if spec.kind == "BF16" else ("F32", x.astype(np.float32))}
    std = _gain(spec.name) / math.sqrt(spec.shape[1])
    if heavy_tailed and spec.kind == "fp4":  # Student t, 4 degrees of freedom (variance 2), same std
        w = rng.standard_t(4, spec.shape) * (std / math.sqrt(2))
    else:
        w = rng.normal(0, std, spec.shape)
    if spec.kind == "fp8":
        q, s, deq = quantize_fp8(w)
        packed = {spec.name: ("F8_E4M3", q), scale_name(spec.name): ("F8_E8M0", s)}
    else:
        q, s, deq = quantize_fp4(w)
        packed = {spec.name: ("I8", q), scale_name(spec.name): ("F8_E8M0", s)}
    return {spec.name: ("BF16", bf16_bits(deq))} if bf16 else packed


def _shard_of(name: str, n_layers: int, n_main: int, n_shards: int) -> int:
    """Shard index: layers split evenly over the main shards, embed first, head/norm last, MTP in the last."""
    if name.startswith("mtp."):
        return n_shards - 1
    if name.startswith("layers."):
        return int(name.split(".")[1]) * n_main // n_layers
    return 0 if name.startswith("embed") else n_main - 1


def write_safetensors(path: Path, tensors: dict, metadata=None):
    """Write {name: (dtype, array)} as safetensors, ordered and padded like the `safetensors` package."""
    items = sorted(tensors.items(), key=lambda kv: (DTYPE_ORDER.index(kv[1][0]), kv[0]))
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, (dtype, a) in items:
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, (_, a) in items:
            f.write(np.ascontiguousarray(a).tobytes())


def write_official_checkpoint(out_dir, config: dict, seed: int = 0, n_shards: int = 3, with_mtp: bool = True,
                              bf16: bool = False, heavy_tailed: bool = False) -> Path:
    """Write a random checkpoint for `config` (config.json field names, overriding official-b's config).

    bf16=True writes every FP8/FP4 weight dequantized to BF16 without `.scale` (same values as bf16=False
    with the same seed) and drops `quantization_config` from config.json. with_mtp=False writes no mtp.*
    tensors and sets num_nextn_predict_layers to 0. heavy_tailed=True draws the routed experts from a
    Student t distribution (4 degrees of freedom) instead of a normal one, like real FP4 expert weights,
    and the ffn_norm weights from a log-normal one (outlier channels in the MoE input, as in real models).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE_CONFIG, **config}
    if not with_mtp:
        cfg["num_nextn_predict_layers"] = 0
    if bf16:
        cfg.pop("quantization_config", None)
    args = model_args(cfg)
    rng = np.random.default_rng(seed)
    tensors = {}
    for spec in checkpoint_tensors(cfg):
        tensors.update(_tensors(spec, args, rng, bf16, heavy_tailed))

    n_main = max(1, n_shards - 1) if with_mtp else n_shards
    shards = [{} for _ in range(n_shards)]
    for name, t in tensors.items():
        shards[_shard_of(name, args.num_hidden_layers, n_main, n_shards)][name] = t
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(out / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(a.nbytes for _, a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# DeepSeek-V4-Flash's config.json (the fields that differ from BASE_CONFIG).
FLASH_CONFIG = {
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "head_dim": 512,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "n_routed_experts": 256,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 2048,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "vocab_size": 129280,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def write_official_headers(out_dir, config: dict, n_shards: int = 46) -> Path:
    """A checkpoint of the official layout with headers only: every shard is a sparse file of its full size
    whose data bytes are zeros that take no disk space (for plans and dry runs of Flash-sized models)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE_CONFIG, **config}
    args = model_args(cfg)
    shards = [{} for _ in range(n_shards)]
    for spec in checkpoint_tensors(cfg):
        for name, (dtype, shape) in on_disk_forms(spec)[0].items():
            shards[_shard_of(name, args.num_hidden_layers, n_shards - 1, n_shards)][name] = (dtype, shape)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        items = sorted(shard.items(), key=lambda kv: (DTYPE_ORDER.index(kv[1][0]), kv[0]))
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (dtype, shape) in items:
            size = math.prod(shape) * np.dtype(NP_DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
