"""Importance statistics of the routed experts' inputs (`ds4-mlx imatrix`), and their use as per-input-channel
weights of the quantization error (`ds4-mlx convert --imatrix`).

For every MoE layer `P` (a module path such as "layers.3.ffn.experts") the file holds, per expert, the
sum over the tokens routed to it of the squared inputs of each input channel:
`P.w1` [E, dim] (input of w1 and w3: the MoE input), `P.w2` [E, inter] (input of w2: the clamped SwiGLU
activation times the route weight), and `P.counts` [E] (tokens routed to each expert).
"""

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..layers.moe import RoutedExperts, clamped_swiglu
from ..model import evaluate_caches
from .recipes import EXPERT, Group

FORMAT = "ds4-mlx-imatrix"
FLOOR = 0.05  # added to the normalised importance (mean 1): channels never active still count a little


def _accumulate(stats: dict, experts: RoutedExperts, x: mx.array, weights: mx.array, indices: mx.array):
    """Add the squared inputs of one MoE call (x [N, dim], weights/indices [N, k]) to `stats`."""
    k = indices.shape[1]
    n_experts = experts.w1.weight.shape[0]
    flat = indices.reshape(-1)
    order = mx.argsort(flat)
    routed = flat[order]
    rows = x[order // k].astype(mx.float32)  # [N*k, dim], grouped by expert
    hidden = clamped_swiglu(experts.w1(rows[:, None], routed, sorted_indices=True),
                            experts.w3(rows[:, None], routed, sorted_indices=True), experts.limit)
    hidden = hidden[:, 0] * weights.reshape(-1)[order][:, None]
    onehot = (routed[:, None] == mx.arange(n_experts)).astype(mx.float32).T  # [E, N*k]
    for name, value in (("w1", onehot @ (rows * rows)), ("w2", onehot @ (hidden * hidden)),
                        ("counts", mx.sum(onehot, axis=1))):
        stats[name] = value if name not in stats else stats[name] + value


@contextmanager
def recording(model):
    """Within the block, every routed-expert call of `model` adds to the returned {module path: stats}."""
    paths = {id(m): path for path, m in model.named_modules() if isinstance(m, RoutedExperts)}
    stats: Dict[str, dict] = {}
    original = RoutedExperts.__call__

    def call(self, x, weights, indices):
        out = original(self, x, weights, indices)
        if id(self) in paths:
            _accumulate(stats.setdefault(paths[id(self)], {}), self, x, weights, indices)
        return out

    RoutedExperts.__call__ = call
    try:
        yield stats
    finally:
        RoutedExperts.__call__ = original


def read_prompts(path: Path, tokenizer) -> List[List[int]]:
    """Token ids of each prompt: one per line, either text, a JSON object {"text": ...} (.jsonl) or
    whitespace-separated integer token ids. `tokenizer()` is called only if some line needs it."""
    prompts, tok = [], None
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        fields = line.split()
        if all(f.lstrip("-").isdigit() for f in fields):
            prompts.append([int(f) for f in fields])
            continue
        text = json.loads(line)["text"] if path.suffix == ".jsonl" else line
        tok = tok or tokenizer()
        prompts.append(list(tok.encode(text)))
    return prompts


def collect(model, prompts: List[List[int]], max_tokens: Optional[int] = None, chunk: int = 512) -> tuple:
    """Run `model` over the prompts (each from a fresh cache, in chunks of `chunk` tokens; the MTP block
    too, if any) and return ({module path: stats}, tokens used)."""
    used = 0
    with recording(model) as stats:
        for ids in prompts:
            ids = ids[: None if max_tokens is None else max_tokens - used]
            if not ids:
                break
            used += len(ids)
            tokens = mx.array([ids], dtype=mx.int32)
            cache, mtp_cache = model.make_cache(), model.make_mtp_cache()
            for start in range(0, len(ids), chunk):
                streams = model.hidden(tokens[:, start : start + chunk], cache)
                following = tokens[:, start + 1 : start + chunk + 1]
                if model.mtp and following.shape[1]:
                    model.mtp_logits(streams[:, : following.shape[1]], following, mtp_cache)
                evaluate_caches(cache)
                mx.eval([list(s.values()) for s in stats.values()])
    return stats, used


def save(path: Path, stats: Dict[str, dict], tokens: int):
    arrays = {f"{module}.{name}": value for module, s in stats.items() for name, value in s.items()}
    with open(path, "wb") as f:  # a file object: MLX would append ".safetensors" to a name without it
        mx.save_safetensors(f, arrays, metadata={"format": FORMAT, "tokens": str(tokens)})


def load(path: Path, groups: List[Group]) -> Dict[str, np.ndarray]:
    """The statistics in `path`, checked against the routed-expert groups of the checkpoint (shapes; a
    warning for groups without statistics, which are quantized with uniform weights)."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError):
        arrays, meta = {}, {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an imatrix file written by `ds4-mlx imatrix`")
    stats = {name: np.array(a, dtype=np.float32) for name, a in arrays.items()}
    experts = [g for g in groups if g.role == EXPERT]
    missing = [g.module for g in experts if expert_importance(stats, g) is None]
    if len(missing) == len(experts):
        raise ValueError(f"{path} has no statistics for any routed expert of this checkpoint")
    if missing:
        print(f"warning: {path} has no statistics for {len(missing)} routed-expert groups "
              f"({', '.join(missing[:3])}...): uniform weights there", file=sys.stderr)
    return stats


def expert_importance(imatrix: Dict[str, np.ndarray], group: Group) -> Optional[np.ndarray]:
    """Per-expert input-channel weights [E, in] for a routed-expert group (None when the file has none for
    it): the mean squared input normalised to mean 1 plus FLOOR; experts never routed get uniform weights."""
    if group.role != EXPERT:
        return None
    module, proj = group.module.rsplit(".", 1)
    sums, counts = imatrix.get(f"{module}.{'w2' if proj == 'w2' else 'w1'}"), imatrix.get(f"{module}.counts")
    if sums is None or counts is None:
        return None
    shape = (len(group.sources), group.sources[0].shape[1])
    if sums.shape != shape or counts.shape != shape[:1]:
        raise ValueError(f"imatrix {module}: statistics of shape {list(sums.shape)}, the checkpoint's "
                         f"{group.name} needs {list(shape)} (collected on another model?)")
    mean = sums / np.maximum(counts, 1)[:, None]
    scale = mean.mean(axis=1, keepdims=True)
    weights = mean / np.where(scale > 0, scale, 1) + FLOOR
    weights[counts == 0] = 1.0
    return weights
