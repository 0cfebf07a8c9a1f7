"""Routed experts over many tokens (prefill) at Flash shapes: the reference (gather_qmm on the quantized
experts) against the wrapper's choice (custom_kernels/moe_prefill.py for affine experts on CUDA:
grouped tensor-core products that read the quantized experts), per recipe and token count, in the same run.

For each recipe (its routed-expert format) and token count N: random experts [256, 2048, 4096] in that
format, x [N, 4096] bf16, 6 experts per token drawn uniformly; the median of --reps timed calls of each
path (after a warm-up call). Reported: ms per call, TFLOP/s of the weight products (2 x 3 x N x 6 x
4096 x 2048 flops), the speedup, the scratch memory (peak above what was allocated before the calls) and
the relative L2 distance between the two outputs.

    python benchmarks/moe_prefill.py [--recipes q2,q4,native] [--tokens 512,2048,4096] [--reps 5]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import flash  # noqa: E402
from ds4_mlx.convert.recipes import EXPERT  # noqa: E402
from ds4_mlx.custom_kernels import backend  # noqa: E402
from ds4_mlx.custom_kernels import moe as moe_kernels  # noqa: E402
from ds4_mlx.custom_kernels import prefill_matmul  # noqa: E402
from ds4_mlx.layers.linear import StackedLinear  # noqa: E402
from ds4_mlx.layers.moe import routed_experts_reference  # noqa: E402

LIMIT = 10.0


def experts(recipe: str, count: int, dim: int, inter: int, seed: int):
    bits, group_size, mode = flash._targets(recipe)[EXPERT]
    out = []
    for i, (fan_in, fan_out) in enumerate(((dim, inter), (inter, dim), (dim, inter))):
        linear = StackedLinear(fan_in, fan_out, count)
        linear.weight = (mx.random.normal((count, fan_out, fan_in), key=mx.random.key(seed + i))
                         * fan_in ** -0.5).astype(mx.bfloat16)
        out.append(linear.to_quantized(group_size, bits, mode))
        mx.eval(out[-1].parameters())
    return (mode, bits, group_size), out


def timed(fn, reps: int):
    """(median seconds, output, peak memory in bytes above what was allocated before)."""
    mx.eval(fn())
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    times = []
    for _ in range(reps):
        seconds, out = flash.clock(fn)
        times.append(seconds)
    return flash.median(times), out, mx.get_peak_memory() - before


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="q2,q4,native")
    parser.add_argument("--tokens", default="512,2048,4096")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="16 experts of [128, 128]: runs on the CPU in seconds")
    parser.add_argument("--out")
    opts = parser.parse_args(argv)
    count, dim, inter, k = (16, 128, 128, 6) if opts.tiny else (256, 4096, 2048, 6)
    results = []
    for recipe in opts.recipes.split(","):
        fmt, (w1, w2, w3) = experts(recipe, count, dim, inter, seed=1)
        for n in (int(t) for t in opts.tokens.split(",")):
            rng = np.random.default_rng(n)
            indices = mx.array(np.stack([rng.choice(count, k, replace=False) for _ in range(n)]), dtype=mx.int32)
            weights = mx.array(rng.uniform(0.2, 1.0, (n, k)), dtype=mx.float32)
            x = mx.random.normal((n, dim), key=mx.random.key(n)).astype(mx.bfloat16)
            ref_s, ref, ref_peak = timed(
                lambda: routed_experts_reference(x, weights, indices, w1, w2, w3, LIMIT, False), opts.reps)
            ours_s, ours, ours_peak = timed(
                lambda: moe_kernels.routed_experts(x, weights, indices, w1, w2, w3, LIMIT, False), opts.reps)
            flops = 2 * 3 * n * k * dim * inter
            row = {"recipe": recipe, "format": dict(zip(("mode", "bits", "group_size"), fmt)), "tokens": n,
                   "reference_ms": ref_s * 1e3, "reference_tflops": flops / ref_s / 1e12,
                   "wrapper_ms": ours_s * 1e3, "wrapper_tflops": flops / ours_s / 1e12, "speedup": ref_s / ours_s,
                   "reference_scratch_bytes": ref_peak, "wrapper_scratch_bytes": ours_peak,
                   "relative_l2": float(mx.linalg.norm(ours - ref) / mx.linalg.norm(ref))}
            flash.log(f"[moe_prefill] {recipe} N={n}: reference {row['reference_ms']:.2f} ms, wrapper "
                      f"{row['wrapper_ms']:.2f} ms ({row['speedup']:.2f}x), rel. L2 {row['relative_l2']:.2e}")
            results.append(row)
    result = {"benchmark": "moe_prefill", "device": flash.device_info(), "kernel_backend": backend.backend(),
              "config": {"experts": count, "dim": dim, "inter": inter, "k": k, "reps": opts.reps,
                         "tile": [prefill_matmul.BM, prefill_matmul.BN, prefill_matmul.BK],
                         "prefill_rows": moe_kernels.moe_prefill.PREFILL_ROWS},
              "results": results}
    flash.emit(result, opts.out)
    return result


if __name__ == "__main__":
    main()
