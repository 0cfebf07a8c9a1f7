"""Operations in one decode step of each kind of layer (window, CSA, HCA) and of the head, custom kernels
on and off: the graph MLX evaluates per token, counted by primitive (mx.export_to_dot). At batch 1 the
decode step is bound by these counts (each op costs microseconds of graph building and encoding on the
host: decode.py's host_split), not by the bytes read, so this is the figure that explains decode speed.

"views" are primitives that normally launch nothing (broadcasts, reshapes, slices, transposes ...);
"launching" is the rest, which approximates the kernels launched. build_ms: the Python time to build
the layer's graph (no evaluation): with the next step built while the GPU runs the current one, a decode
step takes at least the larger of this and the GPU's time.

    python benchmarks/op_count.py [--recipe q2] [--context 4096] [--tiny] [--stub-kernels]

--stub-kernels counts the kernels-on graph where no GPU backend exists (the CPU): every kernel call becomes a
placeholder node that depends on its inputs (mx.depends of its outputs' shapes, one "Depends" node per call,
counted as one launching op), the decode graphs are compiled and the linear layers multiply half-precision inputs
directly (no fp32 casts around them: layers/linear.py's CPU-only exactness) as on a GPU, so the counts are the
GPU's graph's without running a kernel (the placeholders compute nothing: the logits are meaningless).
"""

import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import flash  # noqa: E402
from ds4_mlx.custom_kernels import backend  # noqa: E402
from ds4_mlx.layers import compiled, linear  # noqa: E402


@contextmanager
def stubbed_kernels():
    """Kernel calls as placeholder nodes on any device (see --stub-kernels), decode graphs compiled there too;
    restored on exit."""
    def launch(self, backend_name, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        outputs = [mx.zeros(shape, dtype=dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        mx.eval(outputs)
        return mx.depends(outputs, list(inputs))

    saved = backend.Kernel.launch, backend.backend, linear._exact, compiled.enabled()
    backend.Kernel.launch = launch
    linear._exact = lambda product, x, *args, **kwargs: product(x, *args, **kwargs)
    backend.backend = lambda: "cuda" if backend.enabled() else None
    compiled.set_enabled(True, cpu=True)
    try:
        yield
    finally:
        backend.Kernel.launch, backend.backend, linear._exact = saved[:3]
        compiled.set_enabled(saved[3])


def kernels_as_launches(counts: dict) -> dict:
    """With stubbed kernels: each placeholder ("Depends") node is one kernel launch, not a view."""
    stubs = counts["by_primitive"].get("Depends", 0)
    return counts | {"views": counts["views"] - stubs, "launching": counts["launching"] + stubs}


def layer_counts(model, caches, token: int = 7) -> list:
    """Per layer: the counts of one token's step through it (the caches advance by the token). The positions,
    which Model.hidden makes once for all layers (one op per step), are made and evaluated first."""
    ids = mx.array([[token]], dtype=mx.int32)
    x = model.embed(ids)
    streams = mx.broadcast_to(x[:, :, None], (1, 1, model.hc_mult, x.shape[-1]))
    positions = mx.arange(caches[0].offset, caches[0].offset + 1)
    mx.eval(streams, positions)
    rows = []
    for i, (layer, cache) in enumerate(zip(model.layers, caches)):
        start = time.perf_counter()
        out = layer(streams, cache, ids, positions)
        build = time.perf_counter() - start
        row = {"layer": i, "kind": flash.KINDS[model.args.compress_ratio(i)], "build_ms": build * 1e3}
        row.update(kernels_as_launches(flash.count_ops(out, *cache.arrays())))
        rows.append(row)
        mx.eval(out, cache.arrays())
        streams = out
    return rows


def head_counts(model) -> dict:
    token = mx.array([[3]], dtype=mx.int32)
    x = model.embed(token)
    streams = mx.broadcast_to(x[:, :, None], (1, 1, model.hc_mult, x.shape[-1]))
    logits = model.logits(streams)[0, -1]
    return kernels_as_launches(flash.count_ops(mx.argmax(logits - mx.logsumexp(logits, keepdims=True))))


def main(argv=None) -> dict:
    parser = flash.make_parser(__doc__, layers_default=3)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--stub-kernels", action="store_true",
                        help="count the kernels-on graph without a GPU backend (placeholder kernels)")
    opts = parser.parse_args(argv)
    with stubbed_kernels() if opts.stub_kernels else nullcontext():
        return count(opts)


def count(opts) -> dict:
    overrides, full, args, model, _ = flash.setup(opts, opts.context)
    results = {}
    initial = backend.enabled()
    try:
        for on in flash.kernel_modes(opts.kernels):
            backend.set_enabled(on)
            caches = flash.fresh_caches(model, opts.context, seed=opts.seed + 1)
            flash.decode(model, caches, 2)  # the first use of a kernel builds it
            layers = layer_counts(model, caches)
            per_kind = flash.by_kind([row["launching"] for row in layers], args)
            full_depth = flash.full_depth_layers(per_kind, full)  # None unless every kind was counted
            head = head_counts(model)
            results[flash.mode_name(on)] = {
                "kernel_backend": backend.backend(), "per_layer": layers, "head": head,
                "full_depth_launching": None if full_depth is None else full_depth + head["launching"]}
            flash.log(f"[op_count] kernels {flash.mode_name(on)}: " + ", ".join(
                f"{r['kind']} {r['launching']} ({r['total']})" for r in layers) + f"; head {head['launching']}")
    finally:
        backend.set_enabled(initial)
    result = {"benchmark": "op_count", "device": flash.device_info(opts.bandwidth),
              "config": flash.config_summary(args, full, opts, overrides) | {
                  "context": opts.context, "stub_kernels": opts.stub_kernels}, "results": results}
    flash.emit(result, opts.out)
    return result


if __name__ == "__main__":
    main()
