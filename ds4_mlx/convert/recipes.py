"""Output tensor groups and conversion recipes.

A group is one output parameter and the checkpoint tensors it is built from (the E routed experts of one
projection are one group). A recipe maps a group to a target:

* None: keep the weight as shipped; FP8 -> MLX mxfp8, FP4 -> MLX mxfp4 (lossless repacks), others unchanged;
* "bf16": dequantize FP8/FP4 weights exactly to bfloat16;
* {"group_size", "bits", "mode"}: quantize the (dequantized) weight with mx.quantize.
"""

import re
from dataclasses import dataclass, field
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


def native(group: Group) -> Target:
    return None


def bf16(group: Group) -> Target:
    return "bf16" if group.role in QUANTIZED_ROLES else None


RECIPES: Dict[str, Callable[[Group], Target]] = {"native": native, "bf16": bf16}
