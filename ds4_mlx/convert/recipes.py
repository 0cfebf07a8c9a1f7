"""Output tensor groups and conversion recipes.

A group is one output parameter and the checkpoint tensors it is built from (the E routed experts of one
projection are one group). A recipe maps a group to a target:

* None: keep the weight as shipped; FP8 -> MLX mxfp8, FP4 -> MLX mxfp4 (lossless repacks), others unchanged;
* "bf16": dequantize FP8/FP4 weights exactly to bfloat16;
* {"group_size", "bits", "mode": "affine"}: dequantize, then quantize to MLX's affine format with the
  error-minimising search of quantize.py (with "rtn": True, plain round to nearest: the baseline).

native, bf16: lossless. q2 / q4: routed experts at 2 / 4 bits (affine, `group_size` inputs per scale
and bias); embedding and head (bfloat16 in the release) at 8 bits; the FP8 projections (attention,
shared experts, indexer wq_b, MTP e/h_proj) stay mxfp8 as shipped, which is lossless and smaller than
8-bit affine (8.25 vs 8.5 bits per weight); compressors, indexer weights_proj, router, mHC, norms
and sinks stay as shipped (bfloat16 / float32).
"""

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Union

from .layout import TensorSpec

Target = Optional[Union[str, dict]]

# Roles of the groups; a recipe decides per role (and, if it needs to, per name).
EXPERT = "expert"  # routed experts of one projection, stacked: SwitchLinear
WO_A = "wo_a"  # grouped output projection: SwitchLinear with o_groups "experts"
LINEAR = "linear"  # FP8 projections, shared experts, mtp e_proj/h_proj: nn.Linear
EMBED = "embed"
HEAD = "head"
TID2EID = "tid2eid"
TENSOR = "tensor"  # everything else: norms, compressors, router, mHC, sinks (BF16/F32)

QUANTIZED_ROLES = (EXPERT, WO_A, LINEAR)

_EXPERT_RE = re.compile(r"(.*\.ffn\.experts)\.\d+\.(w[123])\.weight$")
_HC_RE = re.compile(r"(hc_(?:attn|ffn|head))_(fn|base|scale)$")


@dataclass
class Group:
    name: str  # output parameter name, e.g. "layers.0.ffn.experts.w1.weight"
    role: str
    sources: List[TensorSpec] = field(default_factory=list)

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


def output_name(official: str) -> str:
    return _HC_RE.sub(r"\1.\2", official)


def _role(spec: TensorSpec) -> str:
    if spec.kind == "fp8":
        return WO_A if spec.name.endswith("attn.wo_a.weight") else LINEAR
    if spec.name.endswith("ffn.gate.tid2eid"):
        return TID2EID
    return {"embed.weight": EMBED, "head.weight": HEAD}.get(spec.name, TENSOR)


def output_groups(specs: List[TensorSpec]) -> List[Group]:
    groups: Dict[str, Group] = {}
    for spec in specs:
        m = _EXPERT_RE.match(spec.name)
        name, role = (f"{m[1]}.{m[2]}.weight", EXPERT) if m else (output_name(spec.name), _role(spec))
        groups.setdefault(name, Group(name, role)).sources.append(spec)
    return list(groups.values())


def native(group: Group, group_size: Optional[int] = None) -> Target:
    return None


def bf16(group: Group, group_size: Optional[int] = None) -> Target:
    return "bf16" if group.role in QUANTIZED_ROLES else None


def low_bit(bits: int, group: Group, group_size: int) -> Target:
    if group.role == EXPERT:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    if group.role in (EMBED, HEAD):
        return {"group_size": 64, "bits": 8, "mode": "affine"}
    return None


# Each recipe: (group, routed-expert group size) -> target.
RECIPES: Dict[str, Callable[[Group, Optional[int]], Target]] = {
    "native": native,
    "bf16": bf16,
    "q2": partial(low_bit, 2),
    "q4": partial(low_bit, 4),
}
# Routed-expert group size of the quantizing recipes (q2: 128 keeps Flash within ds4's q2 size, see README).
GROUP_SIZE = {"q2": 128, "q4": 64}


def recipe_targets(recipe: str, group_size: Optional[int] = None) -> Callable[[Group], Target]:
    """The group -> target function of a recipe; `group_size` (routed experts) only for q2/q4."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if recipe not in GROUP_SIZE and group_size is not None:
        raise ValueError(f"--group-size applies to {' and '.join(GROUP_SIZE)}, not to {recipe}")
    if group_size not in (None, 32, 64, 128):
        raise ValueError(f"--group-size must be 32, 64 or 128, not {group_size}")
    return partial(RECIPES[recipe], group_size=group_size or GROUP_SIZE.get(recipe))
