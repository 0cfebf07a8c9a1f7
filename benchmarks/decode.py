"""Decode speed of DeepSeek V4 Flash (random weights, N of the 43 layers) at given contexts, with the
custom kernels on and off, against the memory-bandwidth ceiling.

For each context C and kernel mode: fresh caches filled to C without prefill (flash.fill_caches), a
warm-up (the first use of a kernel compiles it; at least 4 steps, so that a CSA window completes in it),
then --tokens decode steps timed as ds4_mlx.generate.Session.generate_tokens runs them (the next step's graph
is built while the current one runs, mx.async_eval). Reported per context and mode:
  - step_ms, tokens_per_s: the N-layer model (embedding, N layers, mHC head, norm, LM head, sampling);
  - head_ms: embedding + head + sampling of one token, timed in isolation; layer_ms = (step - head) / N;
  - full_depth: the 43-layer figure it implies, simple (head + 43 layer_ms) and by_kind (per kind of layer
    from the isolated block times, rescaled to the pipelined total, times the 43 layers' count of each);
  - host_split: one step's Python graph building, MLX's encoding of its ops, and the GPU time left after
    that, each step run alone (flash.host_split), with the step graph's op counts: at batch 1 the step is
    bound by the host, and this shows by how much;
  - with --compiled-ab, `on_eager`: the kernels-on figures with the compiled decode graphs off
    (ds4_mlx/layers/compiled.py), and compiled_speedup = eager step / compiled step;
  - parts_ms: per layer (mean over the N layers) attention excluding the indexer, indexer, MoE, mHC,
    rest (norms), each called in isolation on the live caches (flash.layer_parts: each call evaluated on
    its own, so the parts carry per-call launch/synchronisation overhead that the pipelined loop hides:
    their sum exceeds the pipelined layer time); block_ms is the whole block in isolation;
    parts_scaled_ms splits layer_ms in the parts' proportions; per_layer has every layer's figures;
  - bytes per token (weights a token reads: routed experts k/E, one embedding row, everything else;
    plus the cache it reads at C) and the fraction of the bandwidth ceiling reached (ceiling time /
    measured time), for the N-layer model and the full depth.
The caches advance during a run (warm-up + timed steps + 6 split steps + 2 tokens per part repetition):
a few dozen tokens past C, reported as context_end.

    python benchmarks/decode.py --recipe q2 --layers 8 [--contexts 4096,32768,131072] [--tokens 32]
    python benchmarks/decode.py --recipe q2 --layers 43 --layer-mix first --shared-weights  # full depth
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import flash  # noqa: E402
from ds4_mlx.custom_kernels import backend  # noqa: E402
from ds4_mlx.layers import compiled  # noqa: E402


def parse(argv=None):
    parser = flash.make_parser(__doc__)
    parser.add_argument("--contexts", default="4096,32768,131072",
                        help="comma-separated contexts (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=32,
                        help="timed decode steps per context and mode (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed decode steps first (default %(default)s; fewer than 4 can leave the first "
                             "completion of a CSA window, and the JIT builds of its kernels, in the timed steps)")
    parser.add_argument("--part-reps", type=int, default=5,
                        help="repetitions of each isolated part; 0 skips the breakdown (default %(default)s)")
    parser.add_argument("--compiled-ab", action="store_true",
                        help="also time the kernels-on step with the compiled decode graphs off (eager graphs), "
                             "same run: results[context]['on_eager'] and 'compiled_speedup'")
    parser.add_argument("--no-host-split", dest="host_split", action="store_false",
                        help="skip the build / encode / GPU-tail split of a step (flash.host_split)")
    return parser.parse_args(argv)


def measure(model, args, full, context, on, opts, bandwidth, weights, full_weights):
    backend.set_enabled(on)
    mx.reset_peak_memory()
    caches = flash.fresh_caches(model, context, seed=opts.seed + 1)
    flash.decode(model, caches, opts.warmup, seed=opts.seed + 2)
    seconds = flash.decode(model, caches, opts.tokens, seed=opts.seed + 3)
    step = seconds / opts.tokens
    head = flash.head_seconds(model)
    n = args.num_hidden_layers
    layer = max(step - head, 0.0) / n
    split = flash.host_split(model, caches) if opts.host_split else None
    rows = flash.layer_parts(model, caches, reps=opts.part_reps) if opts.part_reps > 0 else None
    logits = flash.check_logits(model, caches)
    context_end = caches[0].offset

    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    parts = parts_sum = block = scaled = kind_layer = by_kind_layers = None
    if rows:
        parts = {p: sum(r[p] for r in rows) / n for p in flash.PARTS}
        parts_sum = sum(parts.values())
        block = sum(r["block"] for r in rows) / n
        scaled = {p: ms(layer * v / parts_sum) for p, v in parts.items()} if parts_sum else None
        # full depth by kind: isolated block times rescaled so the N layers sum to the pipelined layer time
        scale = (layer * n) / sum(r["block"] for r in rows)
        kind_layer = flash.by_kind([r["block"] * scale for r in rows], args)
        by_kind_layers = flash.full_depth_layers(kind_layer, full)
    full_simple = head + full.num_hidden_layers * layer
    full_by_kind = None if by_kind_layers is None else head + by_kind_layers

    kv = flash.kv_read_bytes(args, context)
    kv_full = flash.kv_read_bytes(full, context)
    total = weights["total"] + kv["total"]
    total_full = full_weights["total"] + kv_full["total"]
    full_best = full_by_kind if full_by_kind is not None else full_simple
    ceiling = None
    if bandwidth:
        ceiling = {
            "ceiling_ms": ms(total / bandwidth),
            "fraction_of_ceiling": (total / bandwidth) / step,
            "full_depth_ceiling_ms": ms(total_full / bandwidth),
            "full_depth_ceiling_tokens_per_s": bandwidth / total_full,
            "full_depth_fraction_of_ceiling": (total_full / bandwidth) / full_best,
        }
    result = {
        "kernels": on,
        "kernel_backend": backend.backend(),
        "context": context,
        "context_end": context_end,
        "tokens": opts.tokens,
        "step_ms": ms(step),
        "tokens_per_s": 1 / step,
        "head_ms": ms(head),
        "layer_ms": ms(layer),
        "layer_ms_by_kind": None if kind_layer is None else {k: ms(v) for k, v in kind_layer.items()},
        "full_depth": {
            "ms_simple": ms(full_simple),
            "tokens_per_s_simple": 1 / full_simple,
            "ms_by_kind": ms(full_by_kind),
            "tokens_per_s_by_kind": None if full_by_kind is None else 1 / full_by_kind,
        },
        "host_split": split,
        "parts_ms": None if parts is None else {p: ms(v) for p, v in parts.items()},
        "parts_sum_ms": ms(parts_sum),
        "block_ms": ms(block),
        "parts_scaled_ms": scaled,
        "per_layer": None if rows is None else [{k: (ms(v) if isinstance(v, float) else v) for k, v in r.items()}
                                                for r in rows],
        "bytes_per_token": {"weights": weights["total"], "kv": kv["total"], "total": total, "kv_detail": kv,
                            "full_depth_weights": full_weights["total"], "full_depth_kv": kv_full["total"],
                            "full_depth_total": total_full},
        "bandwidth": ceiling,
        "logits": logits,
        "peak_memory_bytes": mx.get_peak_memory(),
    }
    del caches
    return result


def main(argv=None) -> dict:
    opts = parse(argv)
    contexts = [int(c) for c in opts.contexts.split(",") if c]
    start = time.perf_counter()
    overrides, full, args, model, estimate = flash.setup(opts, max(contexts))
    device = flash.device_info(opts.bandwidth)
    bandwidth = device["bandwidth_bytes_per_s"]
    weights = flash.weight_bytes_per_token(model)
    full_weights = flash.full_weight_bytes(full, opts.recipe)
    config = flash.config_summary(args, full, opts, overrides)
    config.update(tokens=opts.tokens, warmup=opts.warmup, part_reps=opts.part_reps, contexts=contexts,
                  compiled_decode=compiled.enabled())  # in effect on a GPU; DS4_MLX_COMPILE=0: eager
    results = {}
    initial, compiled_initial = backend.enabled(), compiled.enabled()
    try:
        for context in contexts:
            entry = {}
            for on in flash.kernel_modes(opts.kernels):
                flash.log(f"[decode] context {context}, kernels {flash.mode_name(on)}")
                r = measure(model, args, full, context, on, opts, bandwidth, weights, full_weights)
                entry[flash.mode_name(on)] = r
                flash.log(f"[decode]   {r['tokens_per_s']:.2f} tokens/s ({r['step_ms']:.2f} ms/step, "
                          f"{r['layer_ms']:.3f} ms/layer); full depth "
                          f"{r['full_depth']['tokens_per_s_simple']:.2f} tokens/s")
            if "on" in entry and "off" in entry:
                on_r, off_r = entry["on"], entry["off"]
                off_full, on_full = off_r["full_depth"]["ms_simple"], on_r["full_depth"]["ms_simple"]
                entry["speedup"] = {"step": off_r["step_ms"] / on_r["step_ms"],
                                    "layer": off_r["layer_ms"] / on_r["layer_ms"] if on_r["layer_ms"] else None,
                                    "full_depth_simple": off_full / on_full}
            if opts.compiled_ab and "on" in entry:
                flash.log(f"[decode] context {context}, kernels on, eager graphs (compiled decode graphs off)")
                compiled.set_enabled(False)
                try:
                    entry["on_eager"] = measure(model, args, full, context, True, opts, bandwidth, weights,
                                                full_weights)
                finally:
                    compiled.set_enabled(compiled_initial)
                entry["compiled_speedup"] = entry["on_eager"]["step_ms"] / entry["on"]["step_ms"]
                flash.log(f"[decode]   {entry['on_eager']['tokens_per_s']:.2f} tokens/s eager; compiled graphs "
                          f"x{entry['compiled_speedup']:.3f}")
            results[str(context)] = entry
    finally:
        backend.set_enabled(initial)
    result = {
        "benchmark": "decode",
        "device": device,
        "config": config,
        "memory": {"estimate": estimate, "weights_resident_bytes": flash.weight_bytes(model),
                   "full_depth_weights_resident_bytes": full_weights["resident"], "peak_bytes": mx.get_peak_memory()},
        "weights_per_token": {"model": weights["total"], "per_layer": weights["layers"], "head": weights["head"],
                              "embed_row": weights["embed"], "full_depth": full_weights["total"]},
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    flash.emit(result, opts.out)
    return result


if __name__ == "__main__":
    main()
