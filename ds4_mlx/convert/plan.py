"""The output of a conversion, computed from the checkpoint headers alone: every output tensor's name,
dtype and shape, the quantization entry of each quantized module, and the split into shards."""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .layout import checkpoint_tensors, model_args
from .recipes import EXPERT, WO_A, Group, Target, output_groups
from .safetensors_reader import Checkpoint, TensorInfo

MX_MODES = {"F8_E4M3": (8, "mxfp8"), "I8": (4, "mxfp4")}  # shipped dtype -> lossless MLX layout
KEPT_DTYPES = {"BF16": "BF16", "F32": "F32", "I64": "I32", "I32": "I32"}  # tid2eid becomes int32
AFFINE_BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype: U32, U8, BF16, F32, I32
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * {"U8": 1, "BF16": 2}.get(self.dtype, 4)


@dataclass
class Step:
    """One output group: its target, its output tensors and its quantization entry (None if not quantized)."""

    group: Group
    target: Target
    tensors: List[OutTensor]
    quant: Optional[dict]
    source_bytes: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def params(self) -> int:
        return sum(math.prod(s.shape) for s in self.group.sources)


def shipped_mode(info: TensorInfo):
    """(bits, mode) of the lossless MLX layout of a shipped FP8/FP4 weight, or None for a plain tensor."""
    return MX_MODES.get(info.dtype)


def logical_shape(group: Group, o_groups: int) -> tuple:
    shape = group.sources[0].shape
    if group.role == EXPERT:
        return (len(group.sources), *shape)
    if group.role == WO_A:  # [o_groups * o_lora_rank, in] -> [o_groups, o_lora_rank, in]
        return (o_groups, shape[0] // o_groups, shape[1])
    return shape


def _packed(name: str, shape: tuple, bits: int) -> OutTensor:
    return OutTensor(name, "U32", (*shape[:-1], shape[-1] * bits // 32))


def _check_affine(group: Group, target: dict):
    inp = group.sources[0].shape[-1]
    gs, bits = target["group_size"], target["bits"]
    if target["mode"] != "affine" or bits not in AFFINE_BITS or gs not in GROUP_SIZES:
        raise ValueError(f"{group.name}: unsupported target {target} (affine, bits {AFFINE_BITS}, "
                         f"group size {GROUP_SIZES})")
    if inp % gs:
        raise ValueError(f"group size {gs} does not divide the input size {inp} of {group.name}; "
                         f"choose another --group-size")


def plan_step(ckpt: Checkpoint, group: Group, target: Target, o_groups: int) -> Step:
    info = ckpt.tensors[group.sources[0].name]
    shape, prefix = logical_shape(group, o_groups), group.module + "."
    mode = shipped_mode(info)
    if isinstance(target, dict):
        _check_affine(group, target)
        gs, bits = target["group_size"], target["bits"]
        groups_shape = (*shape[:-1], shape[-1] // gs)
        tensors = [_packed(group.name, shape, bits), OutTensor(prefix + "scales", "BF16", groups_shape),
                   OutTensor(prefix + "biases", "BF16", groups_shape)]
        quant = {"group_size": gs, "bits": bits, "mode": "affine"}
    elif target is None and mode:
        bits, name = mode
        tensors = [_packed(group.name, shape, bits), OutTensor(prefix + "scales", "U8", (*shape[:-1], shape[-1] // 32))]
        quant = {"group_size": 32, "bits": bits, "mode": name}
    else:
        dtype = "BF16" if target == "bf16" else KEPT_DTYPES[info.dtype]
        tensors, quant = [OutTensor(group.name, dtype, shape)], None
    return Step(group, target, tensors, quant, _source_bytes(ckpt, group))


def _source_bytes(ckpt: Checkpoint, group: Group) -> int:
    names = [n for s in group.sources for n in (s.name, s.name.removesuffix(".weight") + ".scale")]
    return sum(ckpt.tensors[n].nbytes for n in names if n in ckpt.tensors)


def plan_steps(ckpt: Checkpoint, recipe: Callable[[Group], Target]) -> List[Step]:
    o_groups = model_args(ckpt.config).o_groups
    return [plan_step(ckpt, g, recipe(g), o_groups) for g in output_groups(checkpoint_tensors(ckpt.config))]


def split_shards(steps: List[Step], max_bytes: int) -> List[List[Step]]:
    """Consecutive steps per shard; a new shard starts when the next step would exceed max_bytes."""
    shards, size = [[]], 0
    for step in steps:
        if shards[-1] and size + step.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(step)
        size += step.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> List[str]:
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def quantization_map(steps: List[Step]) -> Dict[str, dict]:
    return {s.group.module: s.quant for s in steps if s.quant}
