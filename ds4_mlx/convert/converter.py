"""Streaming conversion of an official DeepSeek V4 checkpoint into an MLX model directory.

The plan (plan.py) fixes every output tensor and shard from the checkpoint headers. Shards are then
written one by one, each source tensor read once; weights that are dequantized or quantized go through
in blocks of rows. Memory holds one source tensor (at most the 1 GB embedding or head of Flash), a
block's temporaries and the scales of one output group, whatever the checkpoint size.
"""

import hashlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import imatrix as imx
from .layout import TensorSpec, check_tensors, checkpoint_tensors, scale_name
from .plan import Step, plan_steps, quantization_map, shard_names, shipped_mode, split_shards
from .quantize import affine_quantize, rtn_quantize
from .recipes import GROUP_SIZE, recipe_targets
from .safetensors_reader import Checkpoint, CheckpointError
from .summary import format_table, summarize
from .writer import (FORMAT_VERSION, ShardFile, copy_tokenizer, missing_tokenizer_files, model_config,
                     prepare_output, publish, save_manifest, sha256_file, write_index)


def _block_rows(cols: int) -> int:
    """Rows per block of a weight being (de)quantized: 2^18 elements on the CPU (fastest there: the
    temporaries stay in cache), 2^24 on a GPU."""
    return max(1, (1 << 18 if mx.default_device() == mx.cpu else 1 << 24) // cols)


def _expand_block_scales(s: np.ndarray, out: int, inp: int) -> np.ndarray:
    """FP8 128x128 block exponents -> one exponent per 1x32 group, as MLX mxfp8 wants."""
    return np.repeat(np.repeat(s, 128, axis=-2), 4, axis=-1)[..., :out, : inp // 32]


def _int32(a: np.ndarray, name: str, shard: str) -> np.ndarray:
    if a.size and (a.min() < 0 or a.max() >= 2**31):
        raise CheckpointError(f"tensor {name} in shard {shard}: values [{a.min()}, {a.max()}] do not fit int32")
    return a.astype(np.int32)


def _kept(ckpt: Checkpoint, spec: TensorSpec, out: List[str]) -> Iterator[Tuple[str, np.ndarray]]:
    """A tensor as shipped; FP8/FP4 weights as MLX mxfp8/mxfp4 (same bytes, scales one per 32 inputs)."""
    info = ckpt.tensors[spec.name]
    raw = ckpt.read(spec.name)
    if shipped_mode(info):
        yield out[0], raw
        scales = ckpt.read(scale_name(spec.name))
        yield out[1], _expand_block_scales(scales, *spec.shape) if info.dtype == "F8_E4M3" else scales
    else:
        yield out[0], _int32(raw, spec.name, info.shard) if info.dtype in ("I64", "I32") else raw


def _rows(ckpt: Checkpoint, spec: TensorSpec, dtype) -> Iterator[mx.array]:
    """A weight [out, in] dequantized to `dtype`, in blocks of rows."""
    info = ckpt.tensors[spec.name]
    raw, mode = ckpt.read(spec.name), shipped_mode(info)
    if mode:
        scales = ckpt.read(scale_name(spec.name))
        if info.dtype == "F8_E4M3":
            scales = _expand_block_scales(scales, *spec.shape)
    step = _block_rows(spec.shape[-1])
    for r in range(0, spec.shape[0], step):
        block = mx.array(raw[r : r + step])
        if mode:
            s = mx.array(scales[r : r + step])
            yield mx.dequantize(block.view(mx.uint32), s, group_size=32, bits=mode[0], mode=mode[1], dtype=dtype)
        else:
            yield (block.view(mx.bfloat16) if info.dtype == "BF16" else block).astype(dtype)


def produce(ckpt: Checkpoint, step: Step, importance: Optional[np.ndarray] = None) -> Iterator[Tuple[str, object]]:
    """(output tensor name, next block of its rows) for the output group of `step`; `importance` [E, in]
    weights the quantization error of routed expert e."""
    names, target = [t.name for t in step.tensors], step.target
    for e, spec in enumerate(step.group.sources):
        if isinstance(target, dict):
            quantize = rtn_quantize if target.get("rtn") else affine_quantize
            weights = None if importance is None else mx.array(importance[e])
            for x in _rows(ckpt, spec, mx.float32):
                arrays = quantize(x, target["group_size"], target["bits"], weights)
                mx.eval(arrays)
                yield from zip(names, arrays)
        elif target == "bf16" and shipped_mode(ckpt.tensors[spec.name]):
            for x in _rows(ckpt, spec, mx.bfloat16):
                mx.eval(x)
                yield names[0], x
        else:
            yield from _kept(ckpt, spec, names)


def _warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr)


def _check(ckpt: Checkpoint, mlx_path: Optional[Path]):
    """Fail on missing or mistyped tensors before anything is written; warn about the rest."""
    unused = check_tensors(ckpt.tensors, checkpoint_tensors(ckpt.config))
    if unused:
        _warn(f"{len(unused)} checkpoint tensors are not part of the model and are skipped: {', '.join(unused[:5])}")
    missing = missing_tokenizer_files(ckpt.path)
    if missing and mlx_path:
        _warn(f"{ckpt.path} has no {', '.join(missing)}; converting anyway, add them to {mlx_path} before generating")


def _fingerprint(ckpt: Checkpoint, shards: List[List[Step]], recipe: str, imatrix: Optional[Path]) -> str:
    """What the output depends on: options, plan, source headers and shard files, imatrix contents."""
    files = {t.shard for t in ckpt.tensors.values()}
    desc = {
        "format": FORMAT_VERSION,
        "recipe": recipe,
        "plan": [[(s.group.name, s.target, [(t.name, t.dtype, t.shape) for t in s.tensors]) for s in shard]
                 for shard in shards],
        "source": sorted((t.name, t.shard, t.dtype, t.shape, t.start, t.stop) for t in ckpt.tensors.values()),
        "files": {f: [(ckpt.path / f).stat().st_size, (ckpt.path / f).stat().st_mtime_ns] for f in sorted(files)},
        "imatrix": sha256_file(imatrix) if imatrix else None,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _write_shard(ckpt: Checkpoint, path: Path, steps: List[Step], imatrix, total: tqdm) -> dict:
    size = sum(s.nbytes for s in steps)
    with tqdm(total=size, unit="B", unit_scale=True, desc=path.name, leave=False, position=1, file=sys.stderr) as bar:
        shard = ShardFile(path, [t for s in steps for t in s.tensors], bar)
        for step in steps:
            importance = imx.expert_importance(imatrix, step.group) if imatrix else None
            for name, piece in produce(ckpt, step, importance):
                shard.add(name, piece)
            total.update(step.source_bytes)
        return shard.close()


def dry_run(hf_path, recipe: str = "native", group_size: Optional[int] = None) -> dict:
    """The summary (sizes by tensor class) of a conversion, from the checkpoint headers alone."""
    ckpt = Checkpoint(hf_path)
    _check(ckpt, None)
    return summarize(plan_steps(ckpt, recipe_targets(recipe, group_size)), recipe)


def convert(hf_path, mlx_path, recipe: str = "native", max_shard_bytes: int = 5 << 30, force: bool = False,
            group_size: Optional[int] = None, imatrix=None) -> dict:
    """Convert the official checkpoint in `hf_path` into an MLX model directory `mlx_path`; return the summary.

    Writes into `<mlx_path>.partial` and publishes `mlx_path` only when complete. An interrupted conversion
    leaves `.partial` behind; running the same conversion again keeps its finished shards (verified by
    sha256) and redoes the rest. Raises CheckpointError for a bad checkpoint, FileExistsError for a
    non-empty `mlx_path` without `force`, ValueError for bad options.
    """
    start = time.perf_counter()
    targets, mlx_path = recipe_targets(recipe, group_size), Path(mlx_path)
    if imatrix and recipe not in GROUP_SIZE:
        raise ValueError(f"--imatrix applies to {' and '.join(GROUP_SIZE)}, not to {recipe}")
    ckpt = Checkpoint(hf_path)
    _check(ckpt, mlx_path)
    steps = plan_steps(ckpt, targets)
    shards = split_shards(steps, max_shard_bytes)
    names = shard_names(len(shards))
    stats = imx.load(Path(imatrix), [s.group for s in steps]) if imatrix else None
    fingerprint = _fingerprint(ckpt, shards, recipe, imatrix and Path(imatrix))
    partial, done = prepare_output(mlx_path, force, fingerprint)
    source_bytes = sum(s.source_bytes for s in steps)
    with tqdm(total=source_bytes, unit="B", unit_scale=True, desc="convert", file=sys.stderr) as total:
        for name, shard in zip(names, shards):
            if name in done:
                total.update(sum(s.source_bytes for s in shard))
                continue
            done[name] = _write_shard(ckpt, partial / name, shard, stats, total)
            save_manifest(partial, fingerprint, done)
    weight_map = {t.name: name for name, shard in zip(names, shards) for s in shard for t in s.tensors}
    write_index(partial, weight_map, sum(s.nbytes for s in steps))
    copy_tokenizer(ckpt.path, partial)
    publish(partial, mlx_path, model_config(ckpt.config, quantization_map(steps), recipe))
    return _report(summarize(steps, recipe), time.perf_counter() - start, source_bytes)


def _report(summary: dict, seconds: float, source_bytes: int) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    summary.update(seconds=round(seconds, 2), seconds_per_source_gb=round(seconds / max(source_bytes / 1e9, 1e-9), 2),
                   peak_mlx_bytes=mx.get_peak_memory(), max_rss_bytes=rss)
    print(format_table(summary), file=sys.stderr)
    return summary
