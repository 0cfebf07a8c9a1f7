"""Prefill and generation speed of DeepSeek V4 Flash (random weights, N of the 43 layers) as the context
grows, in the manner of ds4-bench: one session prefilled up to frontiers start, 2 start, 4 start, ...,
--max-context; at each frontier the prefill speed of the last step (previous frontier -> this one, in
chunks of --chunk tokens) and the generation speed of --gen-tokens decode steps there (after one untimed
step). The decode steps stay in the cache, so the next step prefills from the frontier + gen tokens + 1.

Writes a CSV (one row per kernel mode and frontier, N-layer and implied full-depth tokens/s) and, if
matplotlib is installed (`pip install -e '.[bench]'`), a PNG of full-depth tokens/s against context; prints
the same as JSON.

    python benchmarks/sweep.py --recipe q2 --layers 8 [--max-context 131072] [--csv sweep.csv] [--png sweep.png]
"""

import csv
import importlib.util
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import flash  # noqa: E402
from ds4_mlx.custom_kernels import backend  # noqa: E402

COLUMNS = ["kernels", "frontier", "context", "prefill_tokens", "prefill_s", "prefill_tps", "prefill_tps_full_depth",
           "gen_tokens", "gen_s", "gen_tps", "gen_tps_full_depth"]


def parse(argv=None):
    parser = flash.make_parser(__doc__)
    parser.add_argument("--start", type=int, default=2048,
                        help="first frontier; each next one doubles (default %(default)s)")
    parser.add_argument("--max-context", type=int, default=32768, help="last frontier (default %(default)s)")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (default %(default)s)")
    parser.add_argument("--gen-tokens", type=int, default=16,
                        help="timed decode steps per frontier (default %(default)s)")
    parser.add_argument("--csv", default="sweep.csv", help="CSV output (default %(default)s)")
    parser.add_argument("--png", default="sweep.png",
                        help="plot output, if matplotlib is installed (default %(default)s)")
    return parser.parse_args(argv)


def frontiers(start, stop):
    out, f = [], start
    while f < stop:
        out.append(f)
        f *= 2
    return out + [stop]


def sweep(model, args, full, opts, on):
    backend.set_enabled(on)
    rng = random.Random(opts.seed)
    vocab = args.vocab_size
    warm = model.make_cache()
    flash.prefill(model, warm, [rng.randrange(2, vocab) for _ in range(min(opts.chunk, opts.start))], opts.chunk)
    flash.decode(model, warm, 2)
    del warm
    head = flash.head_seconds(model)
    n, depth = args.num_hidden_layers, full.num_hidden_layers
    caches, rows = model.make_cache(), []
    for frontier in frontiers(opts.start, opts.max_context):
        position = caches[0].offset
        row = {"kernels": flash.mode_name(on), "frontier": frontier}
        if frontier > position:
            ids = [rng.randrange(2, vocab) for _ in range(frontier - position)]
            timing = flash.prefill(model, caches, ids, opts.chunk)
            kinds = flash.by_kind(timing["layers"], args)
            layers_full = flash.full_depth_layers(kinds, full)
            if layers_full is None:
                layers_full = depth * sum(timing["layers"]) / n
            row.update(prefill_tokens=len(ids), prefill_s=timing["total"], prefill_tps=len(ids) / timing["total"],
                       prefill_tps_full_depth=len(ids) / (timing["head"] + layers_full))
        row["context"] = caches[0].offset
        flash.decode(model, caches, 1, seed=opts.seed + frontier)
        seconds = flash.decode(model, caches, opts.gen_tokens, seed=opts.seed + frontier + 1)
        step = seconds / opts.gen_tokens
        layer = max(step - head, 0.0) / n
        row.update(gen_tokens=opts.gen_tokens, gen_s=seconds, gen_tps=1 / step,
                   gen_tps_full_depth=1 / (head + depth * layer))
        flash.log(f"[sweep] kernels {row['kernels']} context {row['context']}: prefill "
                  f"{row.get('prefill_tps', float('nan')):.1f} tokens/s, generation {row['gen_tps']:.2f} tokens/s")
        rows.append(row)
    del caches
    return rows


def plot(rows, path, title):
    if importlib.util.find_spec("matplotlib") is None:
        flash.log(f"[sweep] matplotlib is not installed: no plot ({path} not written)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({r["kernels"] for r in rows}):
        mine = [r for r in rows if r["kernels"] == mode]
        pre = [r for r in mine if r.get("prefill_tps_full_depth")]
        label = f"kernels {mode}"
        left.plot([r["context"] for r in pre], [r["prefill_tps_full_depth"] for r in pre], marker="o", label=label)
        right.plot([r["context"] for r in mine], [r["gen_tps_full_depth"] for r in mine], marker="o", label=label)
    for ax, what in ((left, "prefill"), (right, "generation")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"{what} tokens/s (full depth, implied)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None) -> dict:
    opts = parse(argv)
    start = time.perf_counter()
    overrides, full, args, model, estimate = flash.setup(opts, opts.max_context, opts.chunk)
    device = flash.device_info(opts.bandwidth)
    config = flash.config_summary(args, full, opts, overrides)
    config.update(start=opts.start, max_context=opts.max_context, chunk=opts.chunk, gen_tokens=opts.gen_tokens,
                  frontiers=frontiers(opts.start, opts.max_context))
    rows = []
    initial = backend.enabled()
    try:
        for on in flash.kernel_modes(opts.kernels):
            rows += sweep(model, args, full, opts, on)
    finally:
        backend.set_enabled(initial)
    with open(opts.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    title = f"{device['name']}: Flash {opts.recipe}, {args.num_hidden_layers} layers -> {full.num_hidden_layers}"
    png = plot(rows, opts.png, title)
    result = {
        "benchmark": "sweep",
        "device": device,
        "config": config,
        "memory": {"estimate": estimate, "peak_bytes": mx.get_peak_memory()},
        "csv": str(opts.csv),
        "png": png,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    flash.emit(result, opts.out)
    return result


if __name__ == "__main__":
    main()
