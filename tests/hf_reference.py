"""HF transformers reference runner for DeepSeek-V4-Flash checkpoints in the official layout.

Builds a ``transformers`` ``DeepseekV4ForCausalLM`` (torch, CPU, float32, eager attention) from an
official-layout checkpoint directory (``config.json`` + ``model*.safetensors`` with FP8 e4m3 weights and
E8M0 128x128 block scales, routed experts FP4 e2m1 packed in I8 with E8M0 1x32 scales, BF16/F32 rest,
I64 ``tid2eid``, ``mtp.0.*`` ignored) and returns logits for a prefill or a prefill+decode run, laid out
like the official vectors in ``/work/shared/testdata/official-b/vectors.npz``.

Public API
----------
* ``hf_config_from_official(config: dict, **overrides) -> DeepseekV4Config``
* ``load_official_tensors(ckpt_dir, include_mtp=False) -> dict[str, np.ndarray]`` (exact dequantisation to fp32)
* ``hf_state_from_official_tensors(tensors, config) -> dict[str, torch.Tensor]`` (renaming / expert stacking)
* ``build_hf_model(config, tensors, **overrides) -> DeepseekV4ForCausalLM``
* ``load_hf_model(ckpt_dir, **overrides) -> DeepseekV4ForCausalLM``
* ``hf_prefill_logits(model, ids) -> np.ndarray [L, V]``
* ``hf_decode_logits(model, ids, prefill=5) -> np.ndarray [L-prefill+1, V]``
* ``logit_stats(a, b) -> dict`` (per-position max|d| median/p90/max and argmax agreement)

What HF does NOT simulate (the official code does, see the official-b README "Numerics" section):
* FP8 e4m3 activation quantisation (block 128, ue8m0 scale) in front of every FP8/FP4 linear
  (only in the official "fp8" path; the official "bf16 mode" skips it too);
* the KV FP8 round trip of the non-RoPE dims (window kv and main compressed kv, per 64 values);
* the lightning indexer's Hadamard rotation + FP4 e2m1 round trip of q and compressed keys
  (so HF's top-k can differ from the official one at near-ties);
* bf16 storage of activations / residual / KV between ops (HF here runs everything in float32).
With those caveats HF sits at the official self-noise level vs the official bf16 mode and at the FP8
self-noise level vs the official FP8 path (numbers in the README and in tests/test_hf_reference.py).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

__all__ = [
    "hf_config_from_official",
    "read_safetensors_raw",
    "load_official_tensors",
    "official_to_hf_name",
    "hf_state_from_official_tensors",
    "build_hf_model",
    "load_hf_model",
    "hf_prefill_logits",
    "hf_decode_logits",
    "logit_stats",
    "capture_indexer_topk",
    "e4m3_to_float32",
    "e8m0_to_float32",
    "bf16_to_float32",
    "dequant_fp8_block",
    "dequant_fp4_packed",
]

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

# Official-layout config.json fields consumed by hf_config_from_official (anything else is ignored,
# e.g. quantization_config, torch_dtype, transformers_version, topk_method, architectures).
_PASSTHROUGH = (
    "vocab_size",
    "hidden_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "q_lora_rank",
    "num_experts_per_tok",
    "n_routed_experts",
    "n_shared_experts",
    "scoring_func",
    "norm_topk_prob",
    "routed_scaling_factor",
    "max_position_embeddings",
    "rope_theta",
    "compress_rope_theta",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "swiglu_limit",
    "sliding_window",
    "o_groups",
    "o_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "num_nextn_predict_layers",
    "hidden_act",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
)
_OFFICIAL_KEYS = set(_PASSTHROUGH) | {
    "compress_ratios",
    "num_hash_layers",
    "rope_scaling",
    "qk_rope_head_dim",
}
_HF_FIELDS = set(getattr(DeepseekV4Config, "__dataclass_fields__", {}).keys()) | {
    "layer_types",
    "mlp_layer_types",
    "compress_rates",
    "rope_parameters",
    "partial_rotary_factor",
}


def _layer_schedule(ratios: list[int]) -> tuple[list[str], dict[str, int]]:
    """compress_ratios[:n] -> (HF layer_types, HF compress_rates).

    Official semantics (inference/model.py): ratio 0 = sliding window only; ratio 4 = overlapping
    compressor + lightning indexer (CSA); any other ratio > 0 = non-overlapping compressor, no indexer
    (HCA; 128 in Flash). HF has one rate per type, so all HCA layers must share one ratio.
    """
    layer_types: list[str] = []
    hca_rates = set()
    for r in ratios:
        r = int(r)
        if r == 0:
            layer_types.append("sliding_attention")
        elif r == 4:
            layer_types.append("compressed_sparse_attention")
        elif r > 0:
            layer_types.append("heavily_compressed_attention")
            hca_rates.add(r)
        else:
            raise ValueError(f"bad compress ratio {r}")
    if len(hca_rates) > 1:
        raise ValueError(f"HF supports a single HCA compress ratio, got {sorted(hca_rates)}")
    rates = {
        "compressed_sparse_attention": 4,
        "heavily_compressed_attention": hca_rates.pop() if hca_rates else 128,
    }
    return layer_types, rates


def hf_config_from_official(config: Mapping[str, Any], **overrides) -> DeepseekV4Config:
    """Official-layout ``config.json`` dict -> ``DeepseekV4Config`` with exactly that layer schedule.

    * ``layer_types`` from ``compress_ratios[:num_hidden_layers]`` (0 -> sliding_attention,
      4 -> compressed_sparse_attention, other > 0 -> heavily_compressed_attention); the trailing
      entries of ``compress_ratios`` (MTP layers) are dropped. HF's default (V4-Pro style) is NOT used.
    * ``mlp_layer_types``: ``hash_moe`` for layers < ``num_hash_layers``, ``moe`` afterwards.
    * rope: ``main`` = plain RoPE with ``rope_theta`` (window-only layers); ``compress`` =
      ``compress_rope_theta`` + YaRN from ``rope_scaling`` with ``attention_factor=1.0`` (no mscale),
      used by CSA/HCA layers (q, kv, compressed entries, indexer). RoPE width = ``qk_rope_head_dim``.
    * eager attention.

    ``overrides``: keys of the official layout (e.g. ``index_topk=100000``, ``compress_ratios=...``,
    ``num_hash_layers=...``, ``rope_scaling=None``) are applied to the official dict before the
    translation; other ``DeepseekV4Config`` fields (e.g. ``layer_types``) are set on the HF side last.
    """
    cfg = dict(config)
    hf_only: dict[str, Any] = {}
    for k, v in overrides.items():
        if k in _OFFICIAL_KEYS or k in cfg:
            cfg[k] = v
        elif k in _HF_FIELDS:
            hf_only[k] = v
        else:
            raise TypeError(f"unknown override {k!r}")

    n = int(cfg["num_hidden_layers"])
    if "compress_ratios" not in cfg:
        raise KeyError("official config needs compress_ratios")
    ratios = list(cfg["compress_ratios"])
    if len(ratios) < n:
        raise ValueError(f"compress_ratios has {len(ratios)} entries < num_hidden_layers={n}")
    layer_types, compress_rates = _layer_schedule(ratios[:n])
    n_hash = int(cfg.get("num_hash_layers", 0))
    mlp_layer_types = ["hash_moe" if i < n_hash else "moe" for i in range(n)]

    kw: dict[str, Any] = {k: cfg[k] for k in _PASSTHROUGH if k in cfg}
    if int(kw.get("num_key_value_heads", 1)) != 1:
        raise ValueError("DeepSeek-V4 has a single shared KV head")
    if int(kw.get("n_shared_experts", 1)) != 1:
        # HF's shared expert is one MLP of width moe_intermediate_size.
        raise ValueError("HF DeepseekV4 supports exactly one shared expert")
    if cfg.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise ValueError("only sqrtsoftplus routing is checked here")

    head_dim = int(cfg["head_dim"])
    rope_dim = int(cfg.get("qk_rope_head_dim", 64))
    prf = rope_dim / head_dim
    main = {"rope_type": "default", "rope_theta": float(cfg["rope_theta"]), "partial_rotary_factor": prf}
    compress: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(cfg["compress_rope_theta"]),
        "partial_rotary_factor": prf,
    }
    rs = cfg.get("rope_scaling")
    if rs:
        rtype = rs.get("type", rs.get("rope_type"))
        if rtype != "yarn":
            raise ValueError(f"unsupported rope_scaling type {rtype!r}")
        compress.update(
            rope_type="yarn",
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32)),
            beta_slow=float(rs.get("beta_slow", 1)),
            # official precompute_freqs_cis never multiplies cos/sin by YaRN's mscale
            attention_factor=1.0,
            # official find_correction_range floors/ceils the correction range
            truncate=True,
        )

    kw.update(
        layer_types=layer_types,
        mlp_layer_types=mlp_layer_types,
        compress_rates=compress_rates,
        partial_rotary_factor=prf,
        rope_parameters={"main": main, "compress": compress},
        pad_token_id=None,
        use_cache=True,
    )
    kw.update(hf_only)
    hf = DeepseekV4Config(**kw)
    hf._attn_implementation = "eager"
    # sanity: the schedule must survive __post_init__ untouched
    assert list(hf.layer_types) == list(kw["layer_types"]), hf.layer_types
    assert list(hf.mlp_layer_types) == list(kw["mlp_layer_types"]), hf.mlp_layer_types
    return hf


# --------------------------------------------------------------------------------------------------
# Raw safetensors reading + exact dequantisation
# --------------------------------------------------------------------------------------------------

_NP_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "u1",
    "F8_E4M3": "u1",
    "F8_E8M0": "u1",
}


def read_safetensors_raw(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """Parse a .safetensors file by hand: name -> (safetensors dtype string, raw numpy array).

    FP8 dtypes come back as uint8 bit patterns, BF16 as uint16 bit patterns (decode with
    ``e4m3_to_float32`` / ``e8m0_to_float32`` / ``bf16_to_float32``).
    """
    path = Path(path)
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    base = 8 + hlen
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _NP_DTYPES:
            raise ValueError(f"{path.name}:{name}: unsupported dtype {dt}")
        s, e = info["data_offsets"]
        npdt = np.dtype(_NP_DTYPES[dt])
        arr = np.frombuffer(data, dtype=npdt, count=(e - s) // npdt.itemsize, offset=base + s)
        out[name] = (dt, arr.reshape(info["shape"]).copy())
    return out


def _e4m3_table() -> np.ndarray:
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7.0))
    val = sign * val
    val[(exp == 0xF) & ((b & 0x7) == 0x7)] = np.nan  # e4m3fn: S.1111.111 is NaN, no infinities
    return val.astype(np.float32)


_E4M3 = _e4m3_table()
# e2m1 code -> value; low 3 bits magnitude, bit 3 sign (official convert.py FP4_TABLE)
_FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def e4m3_to_float32(u8: np.ndarray) -> np.ndarray:
    """FP8 e4m3fn bit patterns (uint8) -> float32 (exact)."""
    return _E4M3[np.asarray(u8, dtype=np.uint8)]


def e8m0_to_float32(u8: np.ndarray) -> np.ndarray:
    """E8M0 (ue8m0) bit patterns (uint8) -> float32 = 2^(e-127); 255 = NaN (exact)."""
    e = np.asarray(u8, dtype=np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.minimum(e, 254) - 127).astype(np.float32)
    out[e == 255] = np.nan
    return out


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequant_fp8_block(w_u8: np.ndarray, scale_u8: np.ndarray, block: int = 128) -> np.ndarray:
    """FP8 e4m3 weight [out, in] x E8M0 scale [ceil(out/b), ceil(in/b)] -> float32 [out, in]."""
    w = e4m3_to_float32(w_u8)
    s = e8m0_to_float32(scale_u8)
    o, i = w.shape
    if s.shape != (-(-o // block), -(-i // block)):
        raise ValueError(f"fp8 scale shape {s.shape} does not match weight {w.shape} / block {block}")
    s_full = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:o, :i]
    return w * s_full


def dequant_fp4_packed(w_i8: np.ndarray, scale_u8: np.ndarray, block: int = 32) -> np.ndarray:
    """FP4 e2m1 packed two per byte in int8 [out, in/2] (low nibble = even input index) x
    E8M0 scale [out, in/block] -> float32 [out, in]."""
    b = np.asarray(w_i8).view(np.uint8)
    o, half = b.shape
    vals = np.empty((o, 2 * half), dtype=np.float32)
    vals[:, 0::2] = _FP4[b & 0xF]
    vals[:, 1::2] = _FP4[b >> 4]
    s = e8m0_to_float32(scale_u8)
    if s.shape != (o, 2 * half // block):
        raise ValueError(f"fp4 scale shape {s.shape} does not match weight [{o}, {2 * half}] / block {block}")
    return vals * np.repeat(s, block, axis=1)


def load_official_tensors(ckpt_dir: str | Path, include_mtp: bool = False) -> dict[str, np.ndarray]:
    """All tensors of an official-layout checkpoint, dequantised exactly.

    FP8 ``X.weight`` + ``X.scale`` -> float32 ``X.weight`` (128x128 blocks); I8 FP4 ``X.weight`` +
    ``X.scale`` -> float32 (1x32 blocks); BF16/F16/F32 -> float32; integer tensors (tid2eid) stay int64.
    ``.scale`` entries are consumed. ``mtp.*`` is dropped unless ``include_mtp``.
    """
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {ckpt_dir}")
    raw: dict[str, tuple[str, np.ndarray]] = {}
    for f in files:
        for k, v in read_safetensors_raw(f).items():
            if k in raw:
                raise ValueError(f"duplicate tensor {k}")
            raw[k] = v
    out: dict[str, np.ndarray] = {}
    used_scales = set()
    for name, (dt, arr) in raw.items():
        if not include_mtp and name.startswith("mtp."):
            continue
        if dt == "F8_E8M0":
            continue  # scales, consumed with their weight
        scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
        if dt == "F8_E4M3":
            if scale_name not in raw:
                raise KeyError(f"FP8 tensor {name} without {scale_name}")
            out[name] = dequant_fp8_block(arr, raw[scale_name][1], 128)
            used_scales.add(scale_name)
        elif dt == "I8":
            if scale_name not in raw:
                raise KeyError(f"FP4 (I8) tensor {name} without {scale_name}")
            out[name] = dequant_fp4_packed(arr, raw[scale_name][1], 32)
            used_scales.add(scale_name)
        elif dt == "BF16":
            out[name] = bf16_to_float32(arr)
        elif dt in ("F32", "F16", "F64"):
            out[name] = arr.astype(np.float32)
        elif dt in ("I64", "I32", "I16", "U8"):
            out[name] = arr.astype(np.int64)
        else:
            raise ValueError(f"{name}: unexpected dtype {dt}")
    orphans = [k for k, (dt, _) in raw.items() if dt == "F8_E8M0" and k not in used_scales
               and (include_mtp or not k.startswith("mtp."))]
    if orphans:
        raise KeyError(f"scales without a quantised weight: {orphans[:5]}")
    return out


# --------------------------------------------------------------------------------------------------
# Renaming official -> HF (mirrors transformers/conversion_mapping.py "deepseek_v4")
# --------------------------------------------------------------------------------------------------

_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_LAYER = {
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


def official_to_hf_name(name: str) -> str | None:
    """HF parameter name of a non-routed-expert official tensor; None for mtp.* (HF drops MTP).

    Routed experts (``layers.L.ffn.experts.E.w{1,2,3}.weight``) are stacked, not renamed: raises.
    Unknown names raise KeyError.
    """
    if name.startswith("mtp."):
        return None
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise KeyError(f"no HF name for official tensor {name!r}")


def hf_state_from_official_tensors(
    tensors: Mapping[str, np.ndarray], config: Mapping[str, Any] | DeepseekV4Config
) -> dict[str, torch.Tensor]:
    """Rename already-dequantised official-named tensors to HF's ``DeepseekV4ForCausalLM`` state dict.

    ``tensors``: official names (``embed.weight``, ``layers.3.attn.wq_a.weight``, ...), float32 arrays
    (``tid2eid`` may be integer or float; it becomes int64). No ``.scale`` entries (dequantise first).
    ``mtp.*`` is dropped. Routed experts are stacked per layer:
    ``mlp.experts.gate_up_proj[e] = cat([w1_e, w3_e], 0)`` (gate rows then up rows; HF ``chunk(2)``s the
    output in that order) and ``mlp.experts.down_proj[e] = w2_e``.
    ``config``: official config dict or ``DeepseekV4Config`` (used for n_routed_experts / num_hidden_layers).
    """
    if isinstance(config, DeepseekV4Config):
        n_exp, n_layers = int(config.n_routed_experts), int(config.num_hidden_layers)
    else:
        n_exp, n_layers = int(config["n_routed_experts"]), int(config["num_hidden_layers"])

    state: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, dict[int, np.ndarray]]] = {}
    for name, arr in tensors.items():
        if name.endswith(".scale") and not name.startswith("mtp."):
            raise ValueError(f"{name}: pass dequantised tensors (no .scale entries)")
        if name.startswith("mtp."):
            continue
        m = _LAYER_RE.match(name)
        if m:
            layer = int(m.group(1))
            if layer >= n_layers:
                raise KeyError(f"{name}: layer {layer} >= num_hidden_layers={n_layers}")
            em = _EXPERT_RE.match(m.group(2))
            if em:
                experts.setdefault(layer, {}).setdefault(em.group(2), {})[int(em.group(1))] = np.asarray(arr)
                continue
        hf_name = official_to_hf_name(name)
        if hf_name is None:
            continue
        if hf_name in state:
            raise KeyError(f"two official tensors map to {hf_name}")
        if name.endswith("tid2eid"):
            t = torch.from_numpy(np.asarray(arr).astype(np.int64))
        else:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(arr, dtype=np.float32)))
        state[hf_name] = t

    for layer, ws in experts.items():
        for w in ("w1", "w2", "w3"):
            got = sorted(ws.get(w, {}))
            if got != list(range(n_exp)):
                raise KeyError(f"layer {layer}: routed experts {w} present for {got}, expected 0..{n_exp - 1}")
        gate_up = np.stack([np.concatenate([ws["w1"][e], ws["w3"][e]], axis=0) for e in range(n_exp)])
        down = np.stack([ws["w2"][e] for e in range(n_exp)])
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up.astype(np.float32))
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.from_numpy(down.astype(np.float32))
    return state


# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------


def build_hf_model(
    config: Mapping[str, Any] | DeepseekV4Config, tensors: Mapping[str, np.ndarray], **overrides
) -> DeepseekV4ForCausalLM:
    """fp32 eager eval-mode HF model from an official config (dict, or a ready DeepseekV4Config) and
    dequantised official-named tensors. Strict: any missing or unexpected HF key raises (mtp.* ignored)."""
    hf_cfg = config if isinstance(config, DeepseekV4Config) else hf_config_from_official(config, **overrides)
    if isinstance(config, DeepseekV4Config) and overrides:
        raise TypeError("overrides only apply when config is an official dict")
    hf_cfg._attn_implementation = "eager"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = DeepseekV4ForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.float().eval()
    state = hf_state_from_official_tensors(tensors, hf_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={missing[:10]} (n={len(missing)}), "
                       f"unexpected={unexpected[:10]} (n={len(unexpected)})")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"shape mismatch: {bad[:10]}")
    for k, v in state.items():  # keep HF's dtypes (int64 tid2eid, fp32 everything else)
        state[k] = v.to(expected[k].dtype)
    model.load_state_dict(state, strict=True)
    model.config._attn_implementation = "eager"
    return model


def load_hf_model(ckpt_dir: str | Path, **overrides) -> DeepseekV4ForCausalLM:
    """Read an official-layout checkpoint dir (config.json + safetensors shards), dequantise exactly to
    float32, rename to HF names and return an fp32 eager eval-mode ``DeepseekV4ForCausalLM``.
    ``overrides`` go to ``hf_config_from_official`` (e.g. ``index_topk=100000``)."""
    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    tensors = load_official_tensors(ckpt_dir, include_mtp=False)
    return build_hf_model(config, tensors, **overrides)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _ids_tensor(ids) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if t.ndim != 1:
        raise ValueError("ids must be 1-D")
    return t[None]


@torch.no_grad()
def hf_prefill_logits(model: DeepseekV4ForCausalLM, ids) -> np.ndarray:
    """One forward over all ids (no cache, stateless compressor path): logits at every position, [L, V] fp32."""
    out = model(input_ids=_ids_tensor(ids), use_cache=False)
    return out.logits[0].float().numpy()


@torch.no_grad()
def hf_decode_logits(model: DeepseekV4ForCausalLM, ids, prefill: int = 5) -> np.ndarray:
    """Prefill ``ids[:prefill]`` with ``use_cache=True``, then feed one token per call.

    Returns [L - prefill + 1, V] fp32; row j = logits at position prefill-1+j (row 0 = last prefill
    position), i.e. the layout of the official ``decode_logits_L*`` (prefill=5: positions 4..L-1).
    """
    x = _ids_tensor(ids)
    L = x.shape[1]
    if not 1 <= prefill <= L:
        raise ValueError(f"prefill={prefill} out of range for L={L}")
    out = model(input_ids=x[:, :prefill], use_cache=True)
    cache = out.cache
    rows = [out.logits[0, -1].float().clone()]
    for p in range(prefill, L):
        out = model(
            input_ids=x[:, p : p + 1],
            position_ids=torch.tensor([[p]], dtype=torch.long),
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        rows.append(out.logits[0, -1].float().clone())
    return torch.stack(rows).numpy()


def logit_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-position max|a-b| statistics over rows ([..., V]) + argmax agreement."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    d = np.abs(a - b).max(axis=-1)
    return {
        "n": int(d.size),
        "median": float(np.median(d)),
        "p90": float(np.percentile(d, 90)),
        "max": float(d.max()),
        "argmax_agree": float(np.mean(a.argmax(-1) == b.argmax(-1))),
    }


class capture_indexer_topk:
    """Context manager recording HF's lightning-indexer picks (CSA layers) on every forward call.

    ``with capture_indexer_topk(model) as cap: hf_prefill_logits(model, ids)`` then
    ``cap.rows(layer)`` -> int64 [n_query_positions, k] (concatenated over calls; -1 = no entry;
    k = min(index_topk, #compressed entries) of that call, padded with -1 to the widest call).
    Order within a row is torch.topk's (descending score). Compare with the official
    ``indexer_topk_*`` vectors as sets: HF omits the Hadamard+FP4 simulation, so near-ties differ.
    """

    def __init__(self, model: DeepseekV4ForCausalLM):
        self.model = model
        self.calls: dict[int, list[np.ndarray]] = {}
        self._handles = []

    def __enter__(self):
        for i, layer in enumerate(self.model.model.layers):
            comp = layer.self_attn.compressor
            if comp is None or not hasattr(comp, "indexer"):
                continue

            def hook(mod, args, out, i=i):
                self.calls.setdefault(i, []).append(out[0].detach().cpu().numpy().astype(np.int64))

            self._handles.append(comp.indexer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def rows(self, layer: int) -> np.ndarray:
        parts = self.calls[layer]
        k = max(p.shape[-1] for p in parts)
        padded = [np.pad(p, ((0, 0), (0, k - p.shape[-1])), constant_values=-1) for p in parts]
        return np.concatenate(padded, axis=0)
