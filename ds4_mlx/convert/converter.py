"""Streaming conversion of an official DeepSeek V4 checkpoint into an MLX model directory."""

import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .layout import TensorSpec, check_tensors, checkpoint_tensors, model_args, scale_name
from .recipes import EXPERT, RECIPES, WO_A, Group, Target, output_groups
from .safetensors_reader import NP_DTYPES, Checkpoint, CheckpointError
from .writer import ShardWriter, copy_tokenizer, missing_tokenizer_files, prepare_output, publish, write_config

MX_MODES = {"fp8": (8, "mxfp8"), "fp4": (4, "mxfp4")}


@dataclass
class Weight:
    """An MLX weight, optionally in an mx* quantized layout (uint32 packed weight + uint8 E8M0 scales)."""

    weight: mx.array
    scales: Optional[mx.array] = None
    bits: Optional[int] = None
    mode: Optional[str] = None

    def dequantize(self) -> mx.array:
        if self.scales is None:
            return self.weight
        return mx.dequantize(
            self.weight, self.scales, group_size=32, bits=self.bits, mode=self.mode, dtype=mx.bfloat16
        )


def _read(ckpt: Checkpoint, names: List[str], stack: bool) -> np.ndarray:
    """The tensors `names` (same dtype and shape) stacked along a new first axis, or the only one."""
    first = ckpt.tensors[names[0]]
    out = np.empty((len(names), *first.shape), NP_DTYPES[first.dtype])
    for i, name in enumerate(names):
        ckpt.read(name, out=out[i])
    return out if stack else out[0]


def _to_mx(a: np.ndarray, dtype: str, name: str) -> mx.array:
    if dtype == "BF16":
        return mx.array(a).view(mx.bfloat16)
    if dtype == "I64":
        if a.size and (a.min() < 0 or a.max() >= 2**31):
            raise CheckpointError(f"tensor {name}: values [{a.min()}, {a.max()}] do not fit int32")
        return mx.array(a.astype(np.int32))
    return mx.array(a)


def _expand_block_scales(s: np.ndarray, out: int, inp: int) -> np.ndarray:
    """FP8 128x128 block exponents -> one exponent per 1x32 group, as MLX mxfp8 wants."""
    return np.repeat(np.repeat(s, 128, axis=-2), 4, axis=-1)[..., :out, : inp // 32]


def load_group(ckpt: Checkpoint, group: Group, o_groups: int) -> Weight:
    """Read the sources of a group; FP8/FP4 weights come out in the lossless MLX mxfp8/mxfp4 layout."""
    names = [s.name for s in group.sources]
    dtype, kind, stack = ckpt.tensors[names[0]].dtype, group.sources[0].kind, group.role == EXPERT
    w = _read(ckpt, names, stack)
    if kind in MX_MODES and dtype != "BF16":
        s = _read(ckpt, [scale_name(n) for n in names], stack)
        if kind == "fp8":
            s = _expand_block_scales(s, *group.sources[0].shape)
        result = Weight(mx.array(w).view(mx.uint32), mx.array(s), *MX_MODES[kind])
    else:
        result = Weight(_to_mx(w, dtype, names[0]))
    if group.role == WO_A:  # [o_groups * o_lora_rank, in] -> [o_groups, o_lora_rank, in]
        result.weight = result.weight.reshape(o_groups, -1, result.weight.shape[-1])
        if result.scales is not None:
            result.scales = result.scales.reshape(o_groups, -1, result.scales.shape[-1])
    return result


def emit(group: Group, w: Weight, target: Target) -> Tuple[Dict[str, mx.array], Optional[dict]]:
    """Output arrays of a group and its quantization entry (None when not quantized)."""
    prefix = group.module + "."
    if target is None and w.scales is not None:
        quant = {"group_size": 32, "bits": w.bits, "mode": w.mode}
        return {group.name: w.weight, prefix + "scales": w.scales}, quant
    if target is None or target == "bf16":
        return {group.name: w.dequantize()}, None
    packed = mx.quantize(w.dequantize(), **target)
    names = [group.name, prefix + "scales", prefix + "biases"]
    return dict(zip(names, packed)), dict(target)


def _source_bytes(ckpt: Checkpoint, group: Group) -> int:
    names = [n for s in group.sources for n in (s.name, scale_name(s.name))]
    return sum(ckpt.tensors[n].nbytes for n in names if n in ckpt.tensors)


def _warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr)


def _check(ckpt: Checkpoint, specs: List[TensorSpec], mlx_path: Path):
    """Fail on missing or mistyped tensors before anything is written; warn about the rest."""
    unused = check_tensors(ckpt.tensors, specs)
    if unused:
        _warn(f"{len(unused)} checkpoint tensors are not part of the model and are skipped: {', '.join(unused[:5])}")
    missing = missing_tokenizer_files(ckpt.path)
    if missing:
        _warn(f"{ckpt.path} has no {', '.join(missing)}; converting anyway, add them to {mlx_path} before generating")


def _write_groups(ckpt: Checkpoint, groups: List[Group], recipe: str, writer: ShardWriter) -> Dict[str, dict]:
    """Convert and write the groups one by one; return the quantization entry of every quantized module."""
    o_groups = model_args(ckpt.config).o_groups
    quantization = {}
    total = sum(_source_bytes(ckpt, g) for g in groups)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr) as bar:
        for group in groups:
            bar.set_postfix_str(group.name, refresh=False)
            arrays, quant = emit(group, load_group(ckpt, group, o_groups), RECIPES[recipe](group))
            writer.add(arrays)
            if quant:
                quantization[group.module] = quant
            bar.update(_source_bytes(ckpt, group))
    return quantization


def convert(hf_path, mlx_path, recipe: str = "native", max_shard_bytes: int = 5 << 30, force: bool = False):
    """Convert the official checkpoint in `hf_path` into an MLX model directory `mlx_path`.

    Streams one output tensor group at a time; writes into `<mlx_path>.partial` and renames it to `mlx_path`
    only when complete. Raises CheckpointError for a bad checkpoint, FileExistsError for a non-empty
    `mlx_path` without `force`.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    start = time.perf_counter()
    mlx_path = Path(mlx_path)
    ckpt = Checkpoint(hf_path)
    specs = checkpoint_tensors(ckpt.config)
    _check(ckpt, specs, mlx_path)
    partial = prepare_output(mlx_path, force)
    try:
        writer = ShardWriter(partial, max_shard_bytes)
        quantization = _write_groups(ckpt, output_groups(specs), recipe, writer)
        n_shards = writer.finish()
        copy_tokenizer(ckpt.path, partial)
        write_config(partial, ckpt.config, quantization, recipe)
        publish(partial, mlx_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(
        f"wrote {sum(map(len, writer.shards))} tensors ({writer.total_bytes / 1e9:.2f} GB, {n_shards} shards, "
        f"recipe {recipe}) to {mlx_path} in {time.perf_counter() - start:.1f} s; "
        f"peak MLX memory {mx.get_peak_memory() / 1e9:.2f} GB, max RSS {rss / 1e9:.2f} GB",
        file=sys.stderr,
    )
