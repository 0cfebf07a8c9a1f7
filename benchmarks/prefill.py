"""Prefill speed of DeepSeek V4 Flash (random weights, N of the 43 layers), custom kernels on and off.

For each prompt length and kernel mode: a warm-up prefill (--warmup tokens, default two chunks, on a
throwaway cache: the first use of a kernel, and the first chunk that meets a filled cache, build kernels),
then the prompt fed from an empty cache in chunks of --chunk tokens as ds4_mlx.generate.Session.prefill
does (default 2048, its step), timed layer by layer (flash.prefill: one evaluation per layer and chunk).
Reported per length and mode: tokens/s of the N-layer model, per-chunk tokens/s, seconds per layer (by
kind), the embedding + head share, and the full-depth figure (simple: head + 43 x mean layer; by_kind:
each kind's mean layer time times the 43 layers' count of that kind), plus the weight-product throughput
(2 x active weight elements per token; attention scores not counted). With --part-reps R > 0, after
each timed prefill: one more chunk at the context reached, split per layer into attention (without the
indexer), indexer, MoE, mHC and rest (norms), each part evaluated on its own (flash.layer_parts, the
caches restored between repetitions), as parts_ms (mean over the N layers), parts_ms_by_kind and block_ms.

    python benchmarks/prefill.py --recipe q2 --layers 8 [--lengths 8192] [--chunk 2048]
"""

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import flash  # noqa: E402
from ds4_mlx.custom_kernels import backend  # noqa: E402


def parse(argv=None):
    parser = flash.make_parser(__doc__)
    parser.add_argument("--lengths", default="8192", help="comma-separated prompt lengths (default %(default)s)")
    parser.add_argument("--chunk", type=int, default=2048,
                        help="prefill chunk, as Session.prefill's step (default %(default)s)")
    parser.add_argument("--warmup", type=int, help="warm-up prefill tokens (default: two chunks)")
    parser.add_argument("--part-reps", type=int, default=2,
                        help="repetitions of each isolated part of a chunk; 0 skips the split (default %(default)s)")
    return parser.parse_args(argv)


def parts(model, caches, args, chunk, reps):
    """The per-part split of one chunk at the caches' context (flash.layer_parts), in ms."""
    start = caches[0].offset
    rows = flash.layer_parts(model, caches, reps=reps, length=chunk)
    ms = {p: [r[p] * 1e3 for r in rows] for p in flash.PARTS + ("block",)}
    return {"parts_ms": {p: sum(v) / len(v) for p, v in ms.items() if p != "block"},
            "parts_ms_by_kind": {p: flash.by_kind(v, args) for p, v in ms.items()},
            "block_ms": sum(ms["block"]) / len(rows), "parts_chunk": chunk, "parts_context": start}


def prompt(length, vocab, seed):
    rng = random.Random(seed)
    return [rng.randrange(2, vocab) for _ in range(length)]


def summarize(timing, args, full, tokens, flop_params):
    """The figures of one prefill (flash.prefill's seconds) for `tokens` tokens."""
    n = args.num_hidden_layers
    layer_mean = sum(timing["layers"]) / n
    kinds = flash.by_kind(timing["layers"], args)
    by_kind_layers = flash.full_depth_layers(kinds, full)
    full_simple = timing["head"] + full.num_hidden_layers * layer_mean
    full_by_kind = None if by_kind_layers is None else timing["head"] + by_kind_layers
    return {
        "tokens": tokens,
        "seconds": timing["total"],
        "tokens_per_s": tokens / timing["total"],
        "head_s": timing["head"],
        "layer_ms_per_token": layer_mean / tokens * 1e3,
        "layer_s": timing["layers"],
        "layer_s_by_kind": kinds,
        "chunks": [{**c, "tokens_per_s": c["tokens"] / c["seconds"]} for c in timing["chunks"]],
        "full_depth": {
            "seconds_simple": full_simple,
            "tokens_per_s_simple": tokens / full_simple,
            "seconds_by_kind": full_by_kind,
            "tokens_per_s_by_kind": None if full_by_kind is None else tokens / full_by_kind,
        },
        "weight_tflops": 2 * flop_params * tokens / sum(timing["layers"]) / 1e12,
    }


def main(argv=None) -> dict:
    opts = parse(argv)
    lengths = [int(x) for x in opts.lengths.split(",") if x]
    start = time.perf_counter()
    overrides, full, args, model, estimate = flash.setup(opts, max(lengths), opts.chunk)
    device = flash.device_info(opts.bandwidth)
    flop_params = flash.matmul_params_per_token(model)
    config = flash.config_summary(args, full, opts, overrides)
    warmup = opts.warmup if opts.warmup is not None else 2 * opts.chunk
    config.update(lengths=lengths, chunk=opts.chunk, warmup=warmup)
    results = {}
    initial = backend.enabled()
    try:
        for length in lengths:
            ids = prompt(length, args.vocab_size, opts.seed + length)
            entry = {}
            for on in flash.kernel_modes(opts.kernels):
                backend.set_enabled(on)
                mx.reset_peak_memory()
                name = flash.mode_name(on)
                flash.log(f"[prefill] {length} tokens, kernels {name}")
                if warmup:
                    flash.prefill(model, model.make_cache(), prompt(warmup, args.vocab_size, opts.seed), opts.chunk)
                caches = model.make_cache()
                timing = flash.prefill(model, caches, ids, opts.chunk)
                r = summarize(timing, args, full, length, flop_params)
                r.update(kernels=on, kernel_backend=backend.backend(), peak_memory_bytes=mx.get_peak_memory())
                if opts.part_reps > 0:
                    r.update(parts(model, caches, args, min(opts.chunk, length), opts.part_reps))
                entry[name] = r
                flash.log(f"[prefill]   {r['tokens_per_s']:.1f} tokens/s; "
                          f"full depth {r['full_depth']['tokens_per_s_simple']:.1f}")
                del caches
            if "on" in entry and "off" in entry:
                entry["speedup"] = {"total": entry["off"]["seconds"] / entry["on"]["seconds"],
                                    "full_depth_simple": entry["off"]["full_depth"]["seconds_simple"]
                                    / entry["on"]["full_depth"]["seconds_simple"]}
            results[str(length)] = entry
    finally:
        backend.set_enabled(initial)
    result = {
        "benchmark": "prefill",
        "device": device,
        "config": config,
        "memory": {"estimate": estimate, "weights_resident_bytes": flash.weight_bytes(model),
                   "peak_bytes": mx.get_peak_memory()},
        "matmul_params_per_token": flop_params,
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    flash.emit(result, opts.out)
    return result


if __name__ == "__main__":
    main()
