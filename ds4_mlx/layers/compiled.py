"""Decode steps as compiled graphs.

At batch 1 a decode step is bound by per-op costs on the host (building the graph in Python, then MLX
encoding each op), not by the GPU's memory traffic: ~110-200 ops per layer took 1.3-1.8 ms to build on
an H100 host (benchmarks/op_count.py). `decode_graph(module, "method")` replaces a stateless method
(arrays in, arrays out; no cache writes) by its `mx.compile`d form for decode-sized calls on a GPU: the
graph is traced once per input shape and then replayed from C++, and its element-wise chains are fused.
Each new shape runs eagerly once first, so a custom kernel's first-use build check
(custom_kernels.backend.Kernel.run) happens outside tracing.

`python benchmarks/decode.py --kernels on --compiled-ab` measures the step with and without them in
one run. The first compiled step (the second decode step after a load) traces and JIT-compiles the fused
kernels once: ~26 s on an H100 (4 layers), after the ~17-20 s the first (eager) step spends building
MLX's own kernels.

Weights are read when the graph is traced (compiled graphs hold them as constants): the model's weights
must be in place before its first decode step, as `load` does. Prefill-sized calls and the CPU run the
method as written. `set_enabled(False)` (or DS4_MLX_COMPILE=0) turns this off; changing the kernel switch
(custom_kernels.backend.set_enabled) retraces.
"""

import os
import weakref

import mlx.core as mx

from ..custom_kernels import backend

MAX_TOKENS = 8  # B * L of the first argument up to which a call is decode-sized
_enabled = os.environ.get("DS4_MLX_COMPILE", "1") != "0"
_cpu = False  # tests: compile on the CPU as well


def set_enabled(on: bool, cpu: bool = False):
    """Turn compiled decode graphs on or off (`cpu`: also where the default device is the CPU)."""
    global _enabled, _cpu
    _enabled, _cpu = on, cpu


def enabled() -> bool:
    return _enabled


def on_device() -> bool:
    """Whether the default device is one that compiles decode graphs: a GPU (tests: also the CPU)."""
    return mx.default_device() == mx.gpu or _cpu


def decode_graph(module, method: str):
    """module.method(*arrays), compiled for decode-sized calls; holds the module weakly (no cycle
    keeps a dropped model's weights alive)."""
    ref = weakref.ref(module)

    def make():  # a new function object each time: mx.compile caches traces by function identity
        return lambda *arrays: getattr(ref(), method)(*arrays)

    fn = make()
    compiled = {}  # kernel switch -> compiled function of its own
    seen = set()

    def call(*arrays):
        lead = arrays[0].shape
        if not _enabled or not on_device() or len(lead) < 2 or lead[0] * lead[1] > MAX_TOKENS:
            return fn(*arrays)
        switch = backend.enabled()
        key = (switch, tuple((a.shape, a.dtype) for a in arrays))
        if key not in seen:  # eagerly first: kernels build and check outside tracing
            seen.add(key)
            return fn(*arrays)
        if switch not in compiled:
            compiled[switch] = mx.compile(make())
        return compiled[switch](*arrays)

    return call
