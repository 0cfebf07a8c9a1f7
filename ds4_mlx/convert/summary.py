"""Sizes of a conversion by tensor class: the `--dry-run` report and the table printed after converting."""

from typing import Dict, List

from .plan import Step
from .recipes import EXPERT

CLASSES = (
    "routed experts", "attention", "shared experts", "embedding", "head", "compressor", "indexer",
    "router", "mHC", "norms", "mtp",
)


def tensor_class(name: str) -> str:
    """The class of an output group by name; everything under mtp.* is "mtp" (ds4 ships it separately)."""
    if name.startswith("mtp."):
        return "mtp"
    for key, cls in ((".ffn.experts.", "routed experts"), (".shared_experts.", "shared experts"),
                     (".indexer.", "indexer"), (".compressor.", "compressor"), (".attn.", "attention"),
                     (".ffn.gate.", "router"), ("hc_", "mHC")):
        if key in name:
            return cls
    return {"embed.weight": "embedding", "head.weight": "head"}.get(name, "norms")


def summarize(steps: List[Step], recipe: str) -> dict:
    """{recipe, group_size (of the routed experts, if quantized), total_bytes, main_bytes (without mtp.*),
    classes: {class: {tensors, params, bytes, bits_per_weight}}}."""
    quantized = [s.target["group_size"] for s in steps if s.group.role == EXPERT and isinstance(s.target, dict)]
    classes: Dict[str, dict] = {}
    for step in steps:
        c = classes.setdefault(tensor_class(step.group.name), {"tensors": 0, "params": 0, "bytes": 0})
        c["tensors"] += len(step.tensors)
        c["params"] += step.params
        c["bytes"] += step.nbytes
    for c in classes.values():
        c["bits_per_weight"] = round(8 * c["bytes"] / max(c["params"], 1), 4)
    total = sum(c["bytes"] for c in classes.values())
    ordered = {k: classes[k] for k in CLASSES if k in classes}
    main = total - classes.get("mtp", {}).get("bytes", 0)
    return {"recipe": recipe, "group_size": quantized[0] if quantized else None, "total_bytes": total,
            "main_bytes": main, "classes": ordered}


def format_table(summary: dict) -> str:
    lines = [f"{'class':<16} {'tensors':>8} {'params':>16} {'bits/weight':>11} {'GB':>9}"]
    for name, c in summary["classes"].items():
        gb = c["bytes"] / 1e9
        lines.append(f"{name:<16} {c['tensors']:>8} {c['params']:>16,} {c['bits_per_weight']:>11.3f} {gb:>9.3f}")
    total, main = summary["total_bytes"], summary["main_bytes"]
    lines.append(f"total {total / 1e9:.2f} GB ({total / 2**30:.2f} GiB); without mtp.* {main / 1e9:.2f} GB "
                 f"({main / 2**30:.2f} GiB); recipe {summary['recipe']}"
                 + (f", routed-expert group size {summary['group_size']}" if summary["group_size"] else ""))
    if "seconds" in summary:
        lines.append(f"time {summary['seconds']:.1f} s ({summary['seconds_per_source_gb']:.1f} s per GB read); peak "
                     f"MLX memory {summary['peak_mlx_bytes'] / 1e9:.2f} GB, max RSS {summary['max_rss_bytes'] / 1e9:.2f} GB")
    return "\n".join(lines)
