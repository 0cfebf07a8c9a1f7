"""The tensors of an official DeepSeek V4 checkpoint (names, dtypes, shapes), derived from config.json."""

from dataclasses import dataclass
from typing import Dict, List

from ..config import ModelArgs
from .safetensors_reader import INDEX_FILE, CheckpointError, TensorInfo

MAX_ERRORS = 10


@dataclass(frozen=True)
class TensorSpec:
    name: str  # official name, e.g. "layers.0.attn.wq_a.weight"
    shape: tuple  # logical shape, [out, in] for linear weights
    kind: str  # "fp8" (+ 128x128 block scale), "fp4" (+ 1x32 scale), or a safetensors dtype: BF16, F32, I64


def model_args(config: dict) -> ModelArgs:
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def scale_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".scale"


def checkpoint_tensors(config: dict) -> List[TensorSpec]:
    """Every tensor the checkpoint must hold, in conversion order."""
    a = model_args(config)
    d = a.hidden_size
    specs = [
        TensorSpec("embed.weight", (a.vocab_size, d), "BF16"),
        *_hc("hc_head", a.hc_mult, a.hc_mult * d, 1),
    ]
    n = a.num_hidden_layers
    for i in range(n):
        specs += _block(a, f"layers.{i}.", a.compress_ratio(i), hashed=i < a.num_hash_layers)
    specs += [TensorSpec("norm.weight", (d,), "BF16"), TensorSpec("head.weight", (a.vocab_size, d), "BF16")]
    for i in range(a.num_nextn_predict_layers):
        p = f"mtp.{i}."
        specs += _block(a, p, a.compress_ratio(n + i), hashed=False)
        specs += [_linear(p + "e_proj", d, d), _linear(p + "h_proj", d, d)]
        specs += [TensorSpec(p + f"{m}.weight", (d,), "BF16") for m in ("enorm", "hnorm", "norm")]
        specs += _hc(p + "hc_head", a.hc_mult, a.hc_mult * d, 1)
    return specs


def _linear(path: str, out: int, inp: int, kind: str = "fp8") -> TensorSpec:
    return TensorSpec(path + ".weight", (out, inp), kind)


def _hc(prefix: str, n: int, width: int, n_scales: int) -> List[TensorSpec]:
    return [
        TensorSpec(prefix + "_fn", (n, width), "F32"),
        TensorSpec(prefix + "_base", (n,), "F32"),
        TensorSpec(prefix + "_scale", (n_scales,), "F32"),
    ]


def _compressor(prefix: str, ratio: int, head_dim: int, dim: int) -> List[TensorSpec]:
    width = (2 if ratio == 4 else 1) * head_dim  # ratio-4 compressors keep two overlapping halves
    return [
        TensorSpec(prefix + "wkv.weight", (width, dim), "BF16"),
        TensorSpec(prefix + "wgate.weight", (width, dim), "BF16"),
        TensorSpec(prefix + "ape", (ratio, width), "F32"),
        TensorSpec(prefix + "norm.weight", (head_dim,), "BF16"),
    ]


def _block(a: ModelArgs, p: str, ratio: int, hashed: bool) -> List[TensorSpec]:
    d, hd, qr, inter = a.hidden_size, a.head_dim, a.q_lora_rank, a.moe_intermediate_size
    n_mix = (2 + a.hc_mult) * a.hc_mult
    specs = [
        *_hc(p + "hc_attn", n_mix, a.hc_mult * d, 3),
        *_hc(p + "hc_ffn", n_mix, a.hc_mult * d, 3),
        TensorSpec(p + "attn_norm.weight", (d,), "BF16"),
        TensorSpec(p + "ffn_norm.weight", (d,), "BF16"),
        _linear(p + "attn.wq_a", qr, d),
        TensorSpec(p + "attn.q_norm.weight", (qr,), "BF16"),
        _linear(p + "attn.wq_b", a.num_attention_heads * hd, qr),
        _linear(p + "attn.wkv", hd, d),
        TensorSpec(p + "attn.kv_norm.weight", (hd,), "BF16"),
        _linear(p + "attn.wo_a", a.o_groups * a.o_lora_rank, a.num_attention_heads * hd // a.o_groups),
        _linear(p + "attn.wo_b", d, a.o_groups * a.o_lora_rank),
        TensorSpec(p + "attn.attn_sink", (a.num_attention_heads,), "F32"),
    ]
    if ratio:
        specs += _compressor(p + "attn.compressor.", ratio, hd, d)
    if ratio == 4:
        specs += [
            _linear(p + "attn.indexer.wq_b", a.index_n_heads * a.index_head_dim, qr),
            TensorSpec(p + "attn.indexer.weights_proj.weight", (a.index_n_heads, d), "BF16"),
            *_compressor(p + "attn.indexer.compressor.", ratio, a.index_head_dim, d),
        ]
    specs.append(TensorSpec(p + "ffn.gate.weight", (a.n_routed_experts, d), "BF16"))
    if hashed:
        specs.append(TensorSpec(p + "ffn.gate.tid2eid", (a.vocab_size, a.num_experts_per_tok), "I64"))
    else:
        specs.append(TensorSpec(p + "ffn.gate.bias", (a.n_routed_experts,), "F32"))
    for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        specs += [_linear(f"{p}ffn.experts.{e}.{w}", *shape, "fp4") for e in range(a.n_routed_experts)]
        specs.append(_linear(f"{p}ffn.shared_experts.{w}", *shape))
    return specs


def on_disk_forms(spec: TensorSpec) -> List[Dict[str, tuple]]:
    """The accepted on-disk forms of a tensor, each {name: (dtype, shape)}: quantized or plain BF16."""
    if spec.kind == "I64":  # tid2eid: I64 in the official release; I32 accepted as well
        return [{spec.name: ("I64", spec.shape)}, {spec.name: ("I32", spec.shape)}]
    if spec.kind not in ("fp8", "fp4"):
        return [{spec.name: (spec.kind, spec.shape)}]
    out, inp = spec.shape
    if spec.kind == "fp8":
        blocks = (-(-out // 128), -(-inp // 128))
        packed = {spec.name: ("F8_E4M3", (out, inp)), scale_name(spec.name): ("F8_E8M0", blocks)}
    else:
        packed = {spec.name: ("I8", (out, inp // 2)), scale_name(spec.name): ("F8_E8M0", (out, inp // 32))}
    return [packed, {spec.name: ("BF16", (out, inp))}]


def check_tensors(tensors: Dict[str, TensorInfo], specs: List[TensorSpec]) -> List[str]:
    """Raise CheckpointError listing missing or mistyped tensors; return the names nothing expects."""
    errors, used = [], set()
    for spec in specs:
        forms = on_disk_forms(spec)
        found = tensors.get(spec.name)
        form = next((f for f in forms if found and f[spec.name][0] == found.dtype), None)
        if found and form is None:
            wanted = " or ".join(f"{f[spec.name][0]} {list(f[spec.name][1])}" for f in forms)
            errors.append(f"tensor {spec.name} in shard {found.shard}: expected {wanted}, found {_desc(found)}")
            continue
        for name, (dtype, shape) in (form or forms[0]).items():
            used.add(name)
            t = tensors.get(name)
            if t is None:
                errors.append(f"tensor {name} is missing (not listed in {INDEX_FILE} or any shard)")
            elif (t.dtype, t.shape) != (dtype, tuple(shape)):
                errors.append(f"tensor {name} in shard {t.shard}: expected {dtype} {list(shape)}, found {_desc(t)}")
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise CheckpointError("checkpoint does not match config.json:\n" + "\n".join(errors[:MAX_ERRORS]) + more)
    return [name for name in tensors if name not in used]


def _desc(t: TensorInfo) -> str:
    return f"{t.dtype} {list(t.shape)}"
