"""Shared helpers of the speed benchmarks (decode.py, prefill.py, sweep.py): a DeepSeek V4 Flash model
with random weights in the layout of a converted checkpoint, synthetic caches at a given context, timing
loops in the manner of ds4_mlx.generate, and the bytes a decoded token reads.

Model. The Flash config.json values (../shared/spec/ds4-flash.md section 1) with N of the 43 layers
(`--layers`). `--layer-mix` picks their kinds (window-only = ratio 0, CSA = ratio 4, HCA = ratio 128):
  mixed (default): the 43 layers' proportions (2 window, 21 CSA, 20 HCA; 3 hash-routed) scaled to N by
      largest remainder with at least one of each kind, laid out like the real model (window layers
      first, then CSA/HCA alternating); hash-routed layers round(3 N / 43), at least one;
  first: the first N layers of the real compress_ratios (0, 0, 4, 128, 4, ...; layers 0-2 hash-routed).
Full-depth figures are given two ways: per-layer mean x 43 ("simple") and per kind x the 43 layers' count
of that kind ("by_kind", when the N layers contain every kind). `--layers 43 --layer-mix first
--shared-weights` runs the full depth itself on a card that cannot hold it: layers of one kind (compress
ratio, hash routing) share one set of weights (5 sets, 9 GB in q2) while each keeps its own cache and
routes its own tokens, so the step has the real model's ops, launches and cache traffic; only the weights
read per token may hit in the GPU's L2 cache a little more often than in the real model.

Weights. Random, with the dtypes and quantized layouts a `ds4-mlx convert --recipe R` model has
(ds4_mlx/convert/recipes.py): routed experts affine 2-bit g128 (q2), affine 4-bit g64 (q4), mxfp4
(native, as shipped); attention projections, wo_a, shared experts and the indexer's wq_b mxfp8 (as
shipped, all recipes); embedding and head affine 8-bit g64 (q2/q4) or bfloat16 (native); compressors,
indexer weights_proj and router bfloat16; mHC, sinks, ape and router bias float32; norms bfloat16. The
quantized tensors are generated directly as random packed codes plus scales (and biases) chosen so every
linear maps unit-variance inputs to unit-variance outputs; nothing is built in bfloat16 and then
quantized, and each layer is evaluated as soon as it is built. Router weights are random, so the routed
experts vary from token to token.

Caches. `fill_caches` sets each layer's cache to what a session of C tokens holds, without prefill:
the window ring full, C // ratio compressed rows (and C // 4 indexer keys on CSA layers), compressor
states with their pending rows (score -inf elsewhere), offset C; random values. The row buffers get
256-512 rows of spare capacity so a benchmark does not pay a buffer growth (a copy of all rows that the
real cache pays once per 256 rows, i.e. every 1024 tokens on CSA layers) in its few timed tokens.
"""

import argparse
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ds4_mlx.cache import CompressorState, RowBuffer, WindowCache
from ds4_mlx.config import ModelArgs
from ds4_mlx.convert.recipes import EMBED, EXPERT, HEAD, LINEAR, RECIPES, WO_A, Group, recipe_targets
from ds4_mlx.custom_kernels import backend
from ds4_mlx.layers.attention import Attention
from ds4_mlx.layers.compressor import Compressor
from ds4_mlx.layers.hyper_connections import HyperConnection, HyperHead
from ds4_mlx.layers.linear import Linear, StackedLinear
from ds4_mlx.layers.moe import Gate
from ds4_mlx.layers.numerics import RMSNorm
from ds4_mlx.model import Model, evaluate_caches

# config.json of DeepSeek-V4-Flash (spec section 1). No MTP block: the benchmarks time the main model.
FLASH = {
    "vocab_size": 129280,
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "n_routed_experts": 256,
    "num_experts_per_tok": 6,
    "n_shared_experts": 1,
    "moe_intermediate_size": 2048,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 0,
}

# A tiny stand-in (--tiny) that runs on the CPU in seconds and reaches the same code paths: window,
# CSA and HCA layers, hash routing, a window of 16 and an index_topk below the number of CSA rows.
TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    "head_dim": 128,
    "q_lora_rank": 64,
    "o_groups": 2,
    "o_lora_rank": 64,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "num_hash_layers": 1,
    "sliding_window": 16,
    "compress_ratios": [0, 4, 128, 4, 128, 4],
    "index_n_heads": 4,
    "index_topk": 8,
}

KINDS = {0: "window", 4: "csa", 128: "hca"}
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, HBM peak of the SXM cards
STEP = RowBuffer.step


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- config


def parse_overrides(tiny: bool, config: Optional[str]) -> dict:
    """ModelArgs overrides: TINY with --tiny, then --config (a JSON object, or a path to one)."""
    overrides = dict(TINY) if tiny else {}
    if config:
        text = Path(config).read_text() if os.path.isfile(config) else config
        overrides.update(json.loads(text))
    return overrides


def full_args(overrides: Optional[dict] = None) -> ModelArgs:
    """The full-depth model (Flash, 43 layers, unless overridden)."""
    return ModelArgs(**{**FLASH, **(overrides or {})})


def _largest_remainder(weights: Dict[int, int], n: int) -> Dict[int, int]:
    """n split in proportion to weights (largest remainder), at least one of each kind when n allows."""
    total = sum(weights.values())
    quota = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: quota[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    if n >= len(weights):
        for k in [k for k in counts if counts[k] == 0]:
            donor = max((d for d in counts if counts[d] > 1), key=lambda d: counts[d] - quota[d])
            counts[donor] -= 1
            counts[k] = 1
    return counts


def bench_args(full: ModelArgs, layers: int, mix: str = "mixed") -> ModelArgs:
    """The N-layer benchmark model's args, its layer kinds taken from `full` (see the module doc)."""
    ratios = full.compress_ratios[: full.num_hidden_layers]
    if mix == "first":
        if layers > len(ratios):
            raise ValueError(f"--layer-mix first: the model has only {len(ratios)} layers")
        chosen, hashed = ratios[:layers], min(full.num_hash_layers, layers)
    elif mix == "mixed":
        weights = {r: ratios.count(r) for r in sorted(set(ratios))}
        counts = _largest_remainder(weights, layers)
        chosen = [0] * counts.get(0, 0)
        compressed = [r for r in sorted(counts, key=lambda r: (r != 4, r)) if r]  # CSA first, like the model
        left = {r: counts[r] for r in compressed}
        while any(left.values()):
            for r in compressed:
                if left[r]:
                    chosen.append(r)
                    left[r] -= 1
        hashed = 0
        if full.num_hash_layers:
            hashed = min(layers, max(1, round(layers * full.num_hash_layers / full.num_hidden_layers)))
    else:
        raise ValueError(f"unknown layer mix {mix!r} (mixed or first)")
    fields = {**asdict(full), "num_hidden_layers": layers, "compress_ratios": chosen, "num_hash_layers": hashed,
              "num_nextn_predict_layers": 0}
    return ModelArgs(**fields)


def kind_counts(args: ModelArgs) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for i in range(args.num_hidden_layers):
        kind = KINDS[args.compress_ratio(i)]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def config_summary(args: ModelArgs, full: ModelArgs, opts, overrides: dict) -> dict:
    return {
        "recipe": opts.recipe,
        "layers": args.num_hidden_layers,
        "layer_mix": opts.layer_mix,
        "shared_weights": opts.shared_weights,
        "compress_ratios": args.compress_ratios[: args.num_hidden_layers],
        "hash_layers": args.num_hash_layers,
        "kinds": kind_counts(args),
        "full_depth_layers": full.num_hidden_layers,
        "full_depth_kinds": kind_counts(full),
        "overrides": overrides,
        "mlx_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MLX_", "DS4_MLX_"))},
    }


# ---------------------------------------------------------------- random weights


def _targets(recipe: str):
    """role -> (bits, group_size, mode) of a quantized weight, or None for a plain bfloat16 one."""
    target = recipe_targets(recipe)
    shipped = {EXPERT: (4, 32, "mxfp4"), WO_A: (8, 32, "mxfp8"), LINEAR: (8, 32, "mxfp8"), EMBED: None, HEAD: None}
    out = {}
    for role in shipped:
        t = target(Group("x", role))
        if t is None:
            out[role] = shipped[role]
        elif t == "bf16":
            out[role] = None
        else:
            out[role] = (t["bits"], t["group_size"], t["mode"])
    return out


def _role(path: str, module) -> Optional[str]:
    name = path.rsplit(".", 1)[-1]
    if isinstance(module, StackedLinear):
        return WO_A if name == "wo_a" else EXPERT
    if isinstance(module, nn.Embedding):
        return EMBED
    if isinstance(module, Linear):
        if name == "head":
            return HEAD
        if ".compressor." in f".{path}" or name == "weights_proj":
            return None  # bfloat16 as shipped
        return LINEAR
    return None


_CODE_RMS: Dict[str, float] = {}


def _code_rms(mode: str) -> float:
    """RMS of the values of uniformly random codes of an MX format at scale 1 (e4m3 codes with bit 6
    cleared: no NaN, magnitudes up to 1.875)."""
    if mode not in _CODE_RMS:
        bits = 8 if mode == "mxfp8" else 4
        codes = mx.arange(256, dtype=mx.uint32).astype(mx.uint8)  # every byte: all codes, equally often
        if bits == 8:
            codes = codes & 0xBF
        values = mx.dequantize(codes.reshape(8, 32).view(mx.uint32), mx.full((8, 8 // bits), 127, mx.uint8),
                               group_size=32, bits=bits, mode=mode, dtype=mx.float32)
        _CODE_RMS[mode] = math.sqrt(mx.mean(values * values).item())
    return _CODE_RMS[mode]


def _random_codes(shape, mask: Optional[int], materialize: bool) -> mx.array:
    """uint32 [*shape] of random bytes (each byte & mask); large tensors built in slabs of the first axis
    and evaluated slab by slab (randint's float32 temporaries are 4x the bytes)."""

    def make(s):
        b = mx.random.randint(0, 256, (*s[:-1], s[-1] * 4), dtype=mx.uint8)
        if mask is not None:
            b = b & mask
        return b.view(mx.uint32)

    size = math.prod(shape) * 4
    if not materialize or size <= (256 << 20) or len(shape) < 2:
        return make(shape)
    out = mx.zeros(shape, dtype=mx.uint32)
    rows = max(1, shape[0] * (256 << 20) // size)
    for a in range(0, shape[0], rows):
        out[a : a + rows] = make((min(rows, shape[0] - a), *shape[1:]))
        mx.eval(out)
    return out


def _fill_quantized(module, bits: int, group_size: int, mode: str, sigma: float, materialize: bool):
    shape = module.weight.shape  # packed uint32, shapes known without evaluating anything
    groups = (*shape[:-1], shape[-1] * 32 // bits // group_size)
    if mode == "affine":
        module.weight = _random_codes(shape, None, materialize)
        levels = (1 << bits) - 1
        step = sigma / math.sqrt(((levels + 1) ** 2 - 1) / 12)  # std of step * uniform{0..levels}
        scales = (step * mx.random.uniform(0.5, 1.5, groups)).astype(mx.bfloat16)
        module.scales = scales
        module.biases = (-scales.astype(mx.float32) * (levels / 2)).astype(mx.bfloat16)
    else:
        module.weight = _random_codes(shape, 0xBF if bits == 8 else None, materialize)
        exponent = 127 + round(math.log2(sigma / _code_rms(mode)))
        module.scales = (exponent + mx.random.randint(-1, 2, groups)).astype(mx.uint8)
        if "biases" in module:
            module.biases = None
    if materialize:
        mx.eval(module.parameters())


def _normal(shape, sigma, dtype):
    return (mx.random.normal(shape) * sigma).astype(dtype)


def _fill(root: nn.Module, prefix: str, targets: dict, args: ModelArgs, materialize: bool):
    """Quantize `root` (the model's sub-module at `prefix`) per the recipe and give every known weight a
    random value of the shipped dtype; parameters of unknown modules keep their constructor values."""

    def predicate(path, module):
        role = _role(prefix + path, module)
        if role is None or targets.get(role) is None:
            return False
        bits, group_size, mode = targets[role]
        return {"group_size": group_size, "bits": bits, "mode": mode}

    nn.quantize(root, class_predicate=predicate)
    for path, module in root.named_modules():
        full = prefix + path if path else prefix.rstrip(".")
        role = _role(full, module) if not hasattr(module, "bits") else None
        if hasattr(module, "bits") and hasattr(module, "scales"):  # quantized linear / stacked / embedding
            if isinstance(module, nn.QuantizedEmbedding):
                sigma = 1.0
            else:
                sigma = 1.0 / math.sqrt(module.scales.shape[-1] * module.group_size)
            _fill_quantized(module, module.bits, module.group_size, module.mode, sigma, materialize)
        elif isinstance(module, nn.Embedding):
            module.weight = _normal(module.weight.shape, 1.0, mx.bfloat16)
        elif isinstance(module, (Linear, StackedLinear)) or role is not None:
            module.weight = _normal(module.weight.shape, module.weight.shape[-1] ** -0.5, mx.bfloat16)
            if materialize:  # one at a time: bf16 experts have fp32 temporaries of twice their size
                mx.eval(module.weight)
        elif isinstance(module, RMSNorm):
            module.weight = mx.ones(module.weight.shape, dtype=mx.bfloat16)
        elif isinstance(module, (HyperConnection, HyperHead)):
            module.fn = _normal(module.fn.shape, 0.5 * module.fn.shape[-1] ** -0.5, mx.float32)
            module.base = _normal(module.base.shape, 0.5, mx.float32)
            module.scale = mx.ones(module.scale.shape, dtype=mx.float32)
        elif isinstance(module, Gate):
            module.weight = _normal(module.weight.shape, module.weight.shape[-1] ** -0.5, mx.bfloat16)
            if module.hash:
                # on the CPU stream: MLX 0.32.4's CUDA argsort fails for more than 65535 rows
                noise = mx.random.uniform(shape=(args.vocab_size, args.n_routed_experts))
                picks = mx.argsort(noise, axis=-1, stream=mx.cpu)
                module.tid2eid = picks[:, : args.num_experts_per_tok].astype(mx.int32)
            else:
                module.bias = _normal(module.bias.shape, 0.01, mx.float32)
        elif isinstance(module, Attention):
            module.attn_sink = _normal(module.attn_sink.shape, 1.0, mx.float32)
        elif isinstance(module, Compressor):
            module.ape = _normal(module.ape.shape, 0.1, mx.float32)
    if materialize:
        mx.eval(root.parameters())


def build_model(args: ModelArgs, recipe: str, seed: int = 0, materialize: bool = True,
                shared: bool = False) -> Model:
    """A model of `args` with random weights in `recipe`'s layout. materialize=False: nothing is
    evaluated (the arrays' shapes and dtypes, e.g. for byte counts, cost no memory). shared: layers of
    one kind (compress ratio, hash routing) use the weights of the first layer of that kind."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    mx.random.seed(seed)
    targets = _targets(recipe)
    model = Model(args)
    first_of_kind = {}
    for i, layer in enumerate(model.layers):
        kind = (args.compress_ratio(i), i < args.num_hash_layers)
        template = first_of_kind.setdefault(kind, layer) if shared else layer
        _fill(layer, f"layers.{i}.", targets, args, materialize and template is layer)
        if template is not layer:
            layer.update(template.parameters())
    for name in ("embed", "head", "norm", "hc_head"):
        holder = nn.Module()
        holder[name] = model[name]
        _fill(holder, "", targets, args, materialize)
        model[name] = holder[name]
    return model


# ---------------------------------------------------------------- bytes


def _leaves(module) -> List[tuple]:
    return [(p, a) for p, a in tree_flatten(module.parameters()) if isinstance(a, mx.array)]


def weight_bytes_per_token(model: Model) -> dict:
    """Bytes of weights one decoded token reads: the routed experts k/E of their tensors, one row of the
    embedding (and of tid2eid), everything else fully. Returns {total, layers [per layer], embed, head}."""
    args = model.args
    share = args.num_experts_per_tok / args.n_routed_experts
    per_layer = []
    for layer in model.layers:
        total = 0.0
        for path, a in _leaves(layer):
            if path.startswith("ffn.experts."):
                total += a.nbytes * share
            elif path.endswith("tid2eid"):
                total += a.nbytes / args.vocab_size
            else:
                total += a.nbytes
        per_layer.append(total)
    embed = sum(a.nbytes for _, a in _leaves(model.embed)) / args.vocab_size
    head = sum(a.nbytes for m in (model.head, model.norm, model.hc_head) for _, a in _leaves(m))
    return {"total": sum(per_layer) + embed + head, "layers": per_layer, "embed": embed, "head": head}


def weight_bytes(model: Model) -> int:
    """Resident bytes of all weights (an array shared by layers counted once)."""
    return sum({id(a): a.nbytes for _, a in _leaves(model)}.values())


def matmul_params_per_token(model: Model) -> float:
    """Weight elements a token multiplies in the layers (routed experts k/E; quantized weights at their
    logical size); 2 x this is the weight-product FLOPs per token (attention scores not included)."""
    args = model.args
    share = args.num_experts_per_tok / args.n_routed_experts
    total = 0.0
    for layer in model.layers:
        for path, module in layer.named_modules():
            for name, a in module.items():
                if not isinstance(a, mx.array) or a.ndim < 2 or name in ("scales", "biases", "tid2eid", "ape"):
                    continue
                n = a.size * (32 // module.bits if hasattr(module, "bits") and name == "weight" else 1)
                total += n * (share if path.startswith("ffn.experts") else 1)
    return total


def kv_read_bytes(args: ModelArgs, context: int, item: int = 2) -> dict:
    """Bytes of cache one decoded token at `context` reads (pure-MLX layout: bfloat16 rows, fp32 states):
    every layer's window ring; HCA: all compressed rows and the compressor state; CSA: all indexer keys,
    the top-k selected rows, both compressor states."""
    parts = {"window": 0, "compressed_rows": 0, "index_keys": 0, "compressor_states": 0}
    for i in range(args.num_hidden_layers):
        ratio = args.compress_ratio(i)
        parts["window"] += args.sliding_window * args.head_dim * item
        if not ratio:
            continue
        coff = 2 if ratio == 4 else 1
        rows = context // ratio
        parts["compressor_states"] += 2 * coff * ratio * coff * args.head_dim * 4
        if ratio == 4:
            parts["compressed_rows"] += min(args.index_topk, rows) * args.head_dim * item
            parts["index_keys"] += rows * args.index_head_dim * item
            parts["compressor_states"] += 2 * coff * ratio * coff * args.index_head_dim * 4
        else:
            parts["compressed_rows"] += rows * args.head_dim * item
    return {"total": sum(parts.values()), **parts}


def kv_resident_bytes(args: ModelArgs, context: int, item: int = 2) -> int:
    """Bytes the caches hold at `context` (with the row buffers' spare capacity of fill_caches)."""
    total = 0
    for i in range(args.num_hidden_layers):
        ratio = args.compress_ratio(i)
        total += args.sliding_window * args.head_dim * item
        if ratio:
            coff = 2 if ratio == 4 else 1
            rows = _capacity(context // ratio)
            total += 2 * coff * ratio * coff * args.head_dim * 4 + rows * args.head_dim * item
            if ratio == 4:
                total += 2 * coff * ratio * coff * args.index_head_dim * 4 + rows * args.index_head_dim * item
    return total


def memory_estimate(model_bytes: int, args: ModelArgs, max_context: int, chunk: int = 2048) -> dict:
    """Weights + caches at the largest context + scratch (attention score blocks of up to 2^25 fp32,
    a prefill chunk's activations and the MoE's per-token copies)."""
    kv = kv_resident_bytes(args, max_context)
    act = chunk * args.hc_mult * args.hidden_size * 4 * 6
    moe = chunk * args.num_experts_per_tok * args.moe_intermediate_size * 4 * 4
    scratch = (1 << 25) * 4 * 4 + act + moe
    return {"weights": model_bytes, "kv": kv, "scratch": scratch, "total": model_bytes + kv + scratch}


def gb(x) -> float:
    return round(x / 1e9, 3)


# ---------------------------------------------------------------- device


def device_info(bandwidth: Optional[float] = None) -> dict:
    """The device, the memory bandwidth used for the ceilings (--bandwidth, else by the GPU's name) and the MLX_*
    environment variables set (MLX's CUDA backend reads its graph batching from them: MLX_MAX_OPS_PER_BUFFER,
    MLX_CUDA_GRAPH_CACHE_SIZE, MLX_USE_CUDA_GRAPHS), which change what a host-bound decode step costs."""
    info = {}
    try:
        info = dict(mx.device_info())
    except Exception:  # noqa: BLE001
        pass
    gpu = mx.default_device() == mx.gpu
    kind = "cpu"
    if gpu:
        kind = "cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "gpu"
    name = info.get("device_name") or info.get("name") or kind
    if kind == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if out.returncode == 0 and names:
                name = names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    source = None
    if bandwidth:
        source = "--bandwidth"
    else:
        for key, value in BANDWIDTH.items():
            if key in name and "PCIe" not in name:
                bandwidth, source = value, f"{key} HBM peak"
                break
    memory = info.get("memory_size") or info.get("total_memory")
    return {"name": name, "backend": kind, "mlx": mx.__version__, "memory_bytes": memory,
            "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source,
            "mlx_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")}}


def kernel_modes(choice: str) -> List[bool]:
    return {"on": [True], "off": [False], "both": [True, False]}[choice]


def mode_name(on: bool) -> str:
    return "on" if on else "off"


# ---------------------------------------------------------------- caches


def _capacity(count: int) -> int:
    return (count // STEP + 2) * STEP


def _fill_rows(buffer: RowBuffer, count: int, width: int):
    if count == 0:  # as a session before its first compressed row: no buffer yet
        buffer.data, buffer.count = None, 0
        return
    buffer.data = mx.random.normal((1, _capacity(count), width)).astype(mx.bfloat16)
    buffer.count = count


def _fill_state(state: CompressorState, context: int):
    """A compressor's rolling state after `context` tokens: the previous complete window (ratio 4) and
    the pending tokens of the current one; unseen rows kv 0, score -inf."""
    state.ensure(1)
    r = state.ratio
    pending = context % r
    rows = mx.arange(state.coff * r)
    if state.coff == 2:
        seen = ((rows < r) & (context >= r)) | ((rows >= r) & (rows < r + pending))
    else:
        seen = rows < pending
    seen = seen[None, :, None]
    shape = state.kv.shape
    state.kv = mx.where(seen, mx.random.normal(shape), 0.0).astype(mx.float32)
    state.score = mx.where(seen, mx.random.normal(shape), -mx.inf).astype(mx.float32)


def fill_caches(args: ModelArgs, caches: List[WindowCache], context: int, seed: int = 1):
    """Set `caches` (model.make_cache()) to a session of `context` tokens, with random contents."""
    mx.random.seed(seed)
    for i, cache in enumerate(caches):
        ratio = args.compress_ratio(i)
        cache.offset = context
        cache.ring = mx.random.normal((1, args.sliding_window, args.head_dim)).astype(mx.bfloat16)
        if ratio:
            _fill_state(cache.compressor, context)
            _fill_rows(cache.entries, context // ratio, args.head_dim)
        if ratio == 4:
            _fill_state(cache.index_compressor, context)
            _fill_rows(cache.index_keys, context // ratio, args.index_head_dim)
        mx.eval(cache.arrays())
    return caches


def fresh_caches(model: Model, context: int, seed: int = 1) -> List[WindowCache]:
    caches = model.make_cache()
    if context:
        fill_caches(model.args, caches, context, seed)
    return caches


# ---------------------------------------------------------------- timing


def clock(fn):
    """(seconds, result) of fn() evaluated to completion."""
    mx.synchronize()
    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return time.perf_counter() - start, out


def median(xs):
    return statistics.median(xs) if xs else None


def decode(model: Model, caches: List[WindowCache], steps: int, seed: int = 2) -> float:
    """Seconds for `steps` decode steps as Session.generate_tokens runs them: step n+1's graph is built
    and scheduled (mx.async_eval) before step n's token is read. Greedy sampling, plus a random shift of
    the token id so the hash-routed layers see varied tokens; the data dependency stays."""
    if steps <= 0:
        return 0.0
    vocab = model.args.vocab_size
    shifts = [int(x) for x in mx.random.randint(0, vocab, (steps,), key=mx.random.key(seed)).tolist()]

    def step(token, shift):
        logits = model.logits(model.hidden(token.reshape(1, 1), caches))[0, -1]
        evaluate_caches(caches)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return (mx.argmax(logprobs, axis=-1).astype(mx.int32) + shift) % vocab, logprobs

    token = mx.array(shifts[0], dtype=mx.int32)
    mx.eval(token)
    mx.synchronize()
    start = time.perf_counter()
    pending = step(token, shifts[0])
    mx.async_eval(*pending)
    for n in range(1, steps):
        following = step(pending[0], shifts[n])
        mx.async_eval(*following)
        pending[0].item()
        pending = following
    pending[0].item()
    return time.perf_counter() - start


# primitives that launch nothing (op_count's "views"); the rest approximates the kernels launched
VIEWS = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Slice", "Transpose", "AsStrided", "StopGradient",
         "Depends", "Flatten", "Unflatten", "Split"}
_DOT_LABEL = re.compile(r'label ="([^"]+)", shape=rectangle')


def count_ops(*outputs) -> dict:
    """Primitive counts of the unevaluated graph behind `outputs` (mx.export_to_dot)."""
    buffer = io.StringIO()
    mx.export_to_dot(buffer, *outputs)
    names = Counter(_DOT_LABEL.findall(buffer.getvalue()))
    views = sum(v for k, v in names.items() if k in VIEWS)
    total = sum(names.values())
    return {"total": total, "views": views, "launching": total - views,
            "by_primitive": dict(sorted(names.items(), key=lambda kv: -kv[1]))}


def host_split(model: Model, caches: List[WindowCache], steps: int = 5) -> dict:
    """Where a decode step's time goes, steps run one at a time (not pipelined), median ms of: `build`,
    the Python that builds the step's graph; `encode`, mx.async_eval of it (MLX walks the graph and
    encodes every op on the host, then returns); `gpu_tail`, the wait after that for the GPU to finish
    (near zero when the GPU keeps up with the host). Plus the op counts of one step's graph (an extra,
    untimed step). Advances the caches by steps + 1 tokens."""
    token = mx.array([[5]], dtype=mx.int32)
    times = {"build": [], "encode": [], "gpu_tail": []}
    ops = None
    for n in range(steps + 1):
        mx.synchronize()
        start = time.perf_counter()
        token = mx.argmax(model.logits(model.hidden(token, caches))[0, -1]).astype(mx.int32).reshape(1, 1)
        built = time.perf_counter()
        if n == 0:
            ops = count_ops(token, *[a for c in caches for a in c.arrays()])
        evaluate_caches(caches)
        mx.async_eval(token)
        encoded = time.perf_counter()
        mx.eval(token)
        mx.synchronize()
        if n:
            for name, seconds in (("build", built - start), ("encode", encoded - built),
                                  ("gpu_tail", time.perf_counter() - encoded)):
                times[name].append(seconds * 1e3)
    return {"ms": {name: median(v) for name, v in times.items()},
            "ops": {k: ops[k] for k in ("total", "views", "launching")}}


def head_seconds(model: Model, reps: int = 10) -> float:
    """Median seconds of the embedding lookup + mHC head + norm + LM head + log-softmax + argmax of one
    token, in isolation."""
    token = mx.array([[3]], dtype=mx.int32)

    def run():
        x = model.embed(token)
        streams = mx.broadcast_to(x[:, :, None], (1, 1, model.hc_mult, x.shape[-1]))
        logits = model.logits(streams)[0, -1]
        return mx.argmax(logits - mx.logsumexp(logits, keepdims=True))

    clock(run)
    return median([clock(run)[0] for _ in range(reps)])


PARTS = ("attention", "indexer", "moe", "mhc", "rest")


def _indexer_work(attn, x, cache):
    """What the indexer does for input x [1, L, dim] at the cache's position: its compressor step (on a
    throwaway state: the cache is not changed), queries, head weights and, when the CSA layer has more
    rows than index_topk, the scores and top-k over all indexer keys. None if the layer has no indexer."""
    indexer = getattr(attn, "indexer", None)
    needed = ("compressor", "queries", "head_weights")
    if indexer is None or not hasattr(cache, "index_keys") or not all(hasattr(indexer, n) for n in needed):
        return None
    start, length = cache.offset, x.shape[1]
    positions = start + mx.arange(length)
    qr = attn.q_norm(attn.wq_a(x))
    mx.eval(qr)
    ratio = indexer.compressor.ratio

    def run():
        state = CompressorState(ratio, indexer.head_dim)
        state.kv, state.score = cache.index_compressor.kv, cache.index_compressor.score
        rows = indexer.compressor(x, start, state)
        iq, iw = indexer.queries(qr, positions), indexer.head_weights(x)
        out = [a for a in (rows, state.kv, state.score, iq, iw) if a is not None]
        keys = cache.index_keys.rows()
        if keys is not None and keys.shape[1] > indexer.topk:
            select = getattr(attn, "_select", None)
            if select is not None:
                out += [a for a in select(iq, iw, keys, start) if a is not None]
            else:
                scores = type(indexer).scores(iq, iw, keys)
                out.append(mx.argpartition(-scores.astype(mx.float32), indexer.topk - 1, axis=-1)[..., : indexer.topk])
        return out

    return run


def _restore(cache: WindowCache, state):
    """Put a layer's cache back to `state` (WindowCache.state; None: leave it)."""
    if state is not None:
        cache.state = state
        mx.eval(cache.arrays())


def layer_parts(model: Model, caches: List[WindowCache], reps: int = 5, token: int = 7,
                length: int = 1) -> List[dict]:
    """Per layer, median seconds of each part called in isolation (each call evaluated and synchronized
    on its own) on the live caches: attention (all of Attention.__call__ minus the indexer's share),
    indexer (see _indexer_work), moe, mhc (both collapses and expands), rest (the two RMSNorms), and the
    whole block. Inputs are the layer's real inputs for `length` tokens (one: a decode step; more: a
    prefill chunk). One token: the attention and block calls advance the caches (2 tokens per rep + 1 to
    capture the inputs), accepted, as a few tokens of drift at a context of thousands do not change the
    cost, while restoring would need a second reference to the row buffers, which turns their in-place
    row writes into full copies and distorts the timing. A chunk: each layer's cache is restored (an
    untimed copy, WindowCache.state) before every rep and block call, so each sees the context the chunk
    started from; the caches end one chunk further on."""
    ids = (token + mx.arange(length, dtype=mx.int32)[None]) % model.args.vocab_size
    states = [c.state for c in caches] if length > 1 else None
    x = model.embed(ids)
    streams = mx.broadcast_to(x[:, :, None], (1, length, model.hc_mult, x.shape[-1]))
    inputs = []
    for layer, cache in zip(model.layers, caches):
        inputs.append(streams)
        streams = layer(streams, cache, ids)
        mx.eval(streams, cache.arrays())
    results = []
    for i, (layer, cache) in enumerate(zip(model.layers, caches)):
        times = {name: [] for name in PARTS + ("block",)}
        state = None if states is None else states[i]
        for rep in range(reps + 1):  # the first rep warms up
            _restore(cache, state)
            s0 = inputs[i]
            t_collapse1, (xa, post1, comb1) = clock(lambda: layer.hc_attn.collapse(s0))
            t_norm1, xa_n = clock(lambda: layer.attn_norm(xa))
            indexer = _indexer_work(layer.attn, xa_n, cache)
            t_index = clock(indexer)[0] if indexer is not None else 0.0
            t_attn, out = clock(lambda: [layer.attn(xa_n, cache)] + cache.arrays())
            out = out[0]
            t_expand1, s1 = clock(lambda: HyperConnection.expand(out, s0, post1, comb1))
            t_collapse2, (xf, post2, comb2) = clock(lambda: layer.hc_ffn.collapse(s1))
            t_norm2, xf_n = clock(lambda: layer.ffn_norm(xf))
            t_moe, m = clock(lambda: layer.ffn(xf_n, ids))
            t_expand2, _ = clock(lambda: HyperConnection.expand(m, s1, post2, comb2))
            _restore(cache, state)
            t_block, _ = clock(lambda: [layer(s0, cache, ids)] + cache.arrays())
            if rep == 0:
                continue
            times["attention"].append(max(t_attn - t_index, 0.0))
            times["indexer"].append(t_index)
            times["moe"].append(t_moe)
            times["mhc"].append(t_collapse1 + t_expand1 + t_collapse2 + t_expand2)
            times["rest"].append(t_norm1 + t_norm2)
            times["block"].append(t_block)
        row = {"layer": i, "kind": KINDS[model.args.compress_ratio(i)]}
        row.update({name: median(v) for name, v in times.items()})
        results.append(row)
    return results


def prefill(model: Model, caches: List[WindowCache], ids: List[int], chunk: int) -> dict:
    """Feed `ids` in chunks of `chunk` tokens as Session.prefill does (hidden states of the chunk through
    every layer, the logits of the last position after the last chunk), evaluating after each layer so
    each layer's time is measured (one synchronisation per layer and chunk: a few microseconds against
    chunks of milliseconds). Returns seconds: total, per layer, embedding + head, per chunk."""
    n_layers = len(model.layers)
    layer_s = [0.0] * n_layers
    head_s, chunks = 0.0, []
    for a in range(0, len(ids), chunk):
        piece = mx.array(ids[a : a + chunk], dtype=mx.int32)[None]
        t_chunk = 0.0
        t, streams = clock(lambda: mx.broadcast_to(model.embed(piece)[:, :, None],
                                                   (1, piece.shape[1], model.hc_mult, model.args.hidden_size)))
        head_s += t
        t_chunk += t
        for i, (layer, cache) in enumerate(zip(model.layers, caches)):
            t, out = clock(lambda: [layer(streams, cache, piece)] + cache.arrays())
            streams = out[0]
            layer_s[i] += t
            t_chunk += t
        if a + chunk >= len(ids):
            t, logits = clock(lambda: model.logits(streams[:, -1:])[0, -1])
            head_s += t
            t_chunk += t
            if not bool(mx.all(mx.isfinite(logits)).item()):
                raise FloatingPointError("non-finite logits after prefill: the random weights are not sane")
        chunks.append({"start": a, "tokens": piece.shape[1], "seconds": t_chunk})
    return {"total": sum(layer_s) + head_s, "layers": layer_s, "head": head_s, "chunks": chunks}


def check_logits(model: Model, caches: List[WindowCache]) -> dict:
    """One decode step's logits statistics (they must be finite); advances the caches by one token."""
    logits = model(mx.array([[5]], dtype=mx.int32), caches)[0, -1]
    finite = bool(mx.all(mx.isfinite(logits)).item())
    stats = {"finite": finite, "std": float(mx.std(logits).item()), "max_abs": float(mx.max(mx.abs(logits)).item())}
    if not finite:
        raise FloatingPointError(f"non-finite logits from the random model: {stats}")
    return stats


def by_kind(values: List[float], args: ModelArgs) -> Dict[str, float]:
    """Mean of per-layer values by layer kind."""
    groups: Dict[str, List[float]] = {}
    for i, v in enumerate(values):
        groups.setdefault(KINDS[args.compress_ratio(i)], []).append(v)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def full_depth_layers(per_kind: Dict[str, float], full: ModelArgs) -> Optional[float]:
    """Sum over the full model's layers of the per-kind value, or None if a kind is missing."""
    counts = kind_counts(full)
    if any(k not in per_kind for k in counts):
        return None
    return sum(per_kind[k] * n for k, n in counts.items())


def make_parser(doc: str, layers_default: int = 8, recipe_default: str = "q2"):
    """An ArgumentParser with the arguments every benchmark takes (the script's doc as description)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=recipe_default, choices=list(RECIPES),
                        help="weight layout of a converted model (default %(default)s)")
    parser.add_argument("--layers", type=int, default=layers_default, help="layers in the model (default %(default)s)")
    parser.add_argument("--layer-mix", choices=("mixed", "first"), default="mixed",
                        help="mixed: the 43 layers' proportions of window/CSA/HCA layers; first: the first N "
                             "layers of the real model (default %(default)s)")
    parser.add_argument("--kernels", choices=("on", "off", "both"), default="both",
                        help="custom kernels on, off (pure MLX), or both in the same run (default %(default)s)")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in bytes/s for the ceilings "
                        "(default: 3.35e12 on an H100, 4.8e12 on an H200)")
    parser.add_argument("--shared-weights", action="store_true",
                        help="layers of one kind share one set of weights: the full depth on a card that cannot "
                             "hold it (each layer still routes its own tokens and keeps its own cache)")
    parser.add_argument("--tiny", action="store_true", help="a tiny config that runs on the CPU in seconds")
    parser.add_argument("--config", help="ModelArgs overrides: a JSON object or a path to one (after --tiny)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the memory estimate of every recipe for these layers and contexts, and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON to this file")
    return parser


def setup(opts, max_context: int, chunk: int = 2048):
    """(overrides, full args, bench args, model, memory estimate) for parsed common arguments; prints the
    memory estimate to stderr before any weight is materialized."""
    overrides = parse_overrides(opts.tiny, opts.config)
    full = full_args(overrides)
    args = bench_args(full, opts.layers, opts.layer_mix)
    if opts.estimate:
        table = {}
        for recipe in RECIPES:
            lazy = build_model(args, recipe, materialize=False)
            table[recipe] = {k: gb(v) for k, v in memory_estimate(weight_bytes(lazy), args, max_context, chunk).items()}
        emit({"layers": args.num_hidden_layers, "compress_ratios": args.compress_ratios[: args.num_hidden_layers],
              "max_context": max_context, "estimate_gb": table}, None)
        raise SystemExit(0)
    lazy = build_model(args, opts.recipe, opts.seed, materialize=False, shared=opts.shared_weights)
    estimate = memory_estimate(weight_bytes(lazy), args, max_context, chunk)
    del lazy
    log(f"[flash] {opts.recipe}, {args.num_hidden_layers} layers {args.compress_ratios[:args.num_hidden_layers]}: "
        f"estimated memory {gb(estimate['total'])} GB = weights {gb(estimate['weights'])} + "
        f"KV at {max_context} {gb(estimate['kv'])} + scratch {gb(estimate['scratch'])}")
    info = device_info()
    if info.get("memory_bytes") and estimate["total"] > info["memory_bytes"]:
        log(f"[flash] WARNING: the estimate exceeds the device's {gb(info['memory_bytes'])} GB; use fewer --layers")
    start = time.perf_counter()
    model = build_model(args, opts.recipe, opts.seed, shared=opts.shared_weights)
    log(f"[flash] built in {time.perf_counter() - start:.1f} s, {gb(weight_bytes(model))} GB of weights")
    return overrides, full, args, model, estimate


def full_weight_bytes(full: ModelArgs, recipe: str) -> dict:
    """weight_bytes_per_token of the full-depth model (built lazily: costs no memory)."""
    lazy = build_model(full, recipe, materialize=False)
    out = weight_bytes_per_token(lazy)
    out["resident"] = weight_bytes(lazy)
    del lazy
    return out


def emit(result: dict, out: Optional[str]):
    """Print (and write to `out`) the result as JSON, with the kernels that failed to build and ran their
    pure-MLX reference instead (`kernels_failed`: a kernels-on figure with any is not the kernels' figure)."""
    result["kernels_failed"] = backend.failed()
    if result["kernels_failed"]:
        log(f"[flash] kernels that failed to build (their reference ran instead): {result['kernels_failed']}")
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
