"""Runs ds4-mlx kernels on the CPU: the CUDA flavour of a kernel, compiled by the host C++
compiler against a stub of the CUDA builtins, with one host thread per GPU thread (blocks one
after another, `__shared__` as statics, barriers and warp shuffles through std::barrier).
Every launch also compiles the Metal flavour of the same configuration against a Metal stub (kernels
written for CUDA only, `Kernel.backends`, excepted).

This checks what CI can check without a GPU: that both generated sources are valid C++, and
that the kernel computes what its reference computes. `emulate(monkeypatch)` routes every
`Kernel.launch` through here.
"""

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from ds4_mlx.custom_kernels import backend

CXX = shutil.which("g++") or shutil.which("clang++")
BUILD_DIR = Path(tempfile.gettempdir()) / "ds4-mlx-kernel-emulator"

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint8: "uint8_t",
              mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint16: "uint16_t", mx.int8: "int8_t"}
METAL_TYPES = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.uint8: "uint8_t",
               mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint16: "uint16_t", mx.int8: "int8_t"}
# numpy views of MLX dtypes (half types travel as their bits)
NUMPY_VIEW = {mx.float16: (mx.uint16, np.uint16), mx.bfloat16: (mx.uint16, np.uint16)}

COMMON_STUB = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
struct uint3 { unsigned x, y, z; };
struct k_bf16 {
  uint16_t bits;
  k_bf16() = default;
  k_bf16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); bits = uint16_t(u >> 16); }
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
"""

CUDA_STUB = COMMON_STUB + r"""
#include <barrier>
#include <thread>
#include <vector>
namespace cuda { namespace std = ::std; }
using dim3 = uint3;
using __nv_bfloat16 = k_bf16;
using __half = _Float16;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline thread_local uint3 threadIdx;
inline uint3 blockIdx, blockDim;
inline std::barrier<>* k_block_barrier;
inline std::vector<std::barrier<>*> k_warp_barriers;
inline float* k_exchange;
inline void __syncthreads() { k_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  unsigned t = threadIdx.x;
  std::barrier<>* warp = k_warp_barriers[t / 32];
  k_exchange[t] = v;
  warp->arrive_and_wait();
  float other = k_exchange[t ^ unsigned(offset)];
  warp->arrive_and_wait();
  return other;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
using std::min;
using std::max;
#define __align__(n) __attribute__((aligned(n)))
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct uint2 { unsigned x, y; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
// nvcuda::wmma for 16 x 16 x 16 tiles: lane 0 of each warp holds, computes and stores the whole tile
#define K_HOST_STUB
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment { float v[256]; };
template <typename F> void fill_fragment(F& f, float value) { for (float& e : f.v) e = value; }
template <typename T> void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  for (int m = 0; m < 16; ++m) for (int k = 0; k < 16; ++k) f.v[m * 16 + k] = float(p[m * ld + k]);
}
template <typename T> void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k) for (int n = 0; n < 16; ++n) f.v[k * 16 + n] = float(p[n * ld + k]);
}
template <typename T> void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k) for (int n = 0; n < 16; ++n) f.v[k * 16 + n] = float(p[k * ld + n]);
}
template <typename A, typename B, typename C> void mma_sync(C& d, const A& a, const B& b, const C& c) {
  if ((threadIdx.x & 31u) != 0u) return;
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) {
    float sum = c.v[m * 16 + n];
    for (int k = 0; k < 16; ++k) sum += a.v[m * 16 + k] * b.v[k * 16 + n];
    d.v[m * 16 + n] = sum;
  }
}
template <typename C> void store_matrix_sync(float* p, const C& f, unsigned ld, layout_t) {
  if ((threadIdx.x & 31u) != 0u) return;
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) p[m * ld + n] = f.v[m * 16 + n];
}
}}
"""

METAL_STUB = COMMON_STUB + r"""
#define device
#define threadgroup
#define constant
#define thread
using bfloat16_t = k_bf16;
using half = _Float16;
namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline float rint(float x) { return std::rint(x); }
namespace precise {
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
}
}
template <typename To, typename From> To as_type(From v) { To t; std::memcpy(&t, &v, sizeof(To)); return t; }
enum class mem_flags { mem_none, mem_threadgroup, mem_device };
inline void threadgroup_barrier(mem_flags) {}
template <typename T> T simd_sum(T v) { return v; }
template <typename T> T simd_max(T v) { return v; }
"""


def _template_lines(template, types) -> str:
    lines = []
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {types[value]};")
    return "\n".join(lines) + "\n"


def cuda_source(k: backend.Kernel, inputs, template, output_dtypes) -> str:
    header, body = k.source("cuda")
    params = [f"const {CUDA_TYPES[a.dtype]}* {n}" for n, a in zip(k.inputs, inputs)]
    params += [f"{CUDA_TYPES[d]}* {n}" for n, d in zip(k.outputs, output_dtypes)]
    args = [f"({p.rsplit(' ', 1)[0]})args[{i}]" for i, p in enumerate(params)]
    return (CUDA_STUB + header + "namespace mlx::core::cu {\n"
            + f"__global__ void {k.name}({', '.join(params)}) {{\n"
            + _template_lines(template, CUDA_TYPES) + body + "\n}\n}\n"
            + r"""
extern "C" void k_launch(void** args, unsigned gx, unsigned gy, unsigned gz, unsigned tx) {
  blockDim = {tx, 1, 1};
  std::barrier<> block(tx);
  k_block_barrier = &block;
  std::vector<std::barrier<>*> warps;
  for (unsigned w = 0; w < (tx + 31) / 32; ++w) warps.push_back(new std::barrier<>(std::min(32u, tx - 32 * w)));
  k_warp_barriers = warps;
  std::vector<float> exchange(tx);
  k_exchange = exchange.data();
  for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
    blockIdx = {x, y, z};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < tx; ++t) threads.emplace_back([=] {
      threadIdx = {t, 0, 0};
      mlx::core::cu::""" + k.name + "(" + ", ".join(args) + r""");
    });
    for (auto& th : threads) th.join();
  }
  for (auto* w : warps) delete w;
}
""")


def metal_source(k: backend.Kernel, inputs, template, output_dtypes) -> str:
    header, body = k.source("metal")
    params = [f"const device {METAL_TYPES[a.dtype]}* {n}" for n, a in zip(k.inputs, inputs)]
    params += [f"device {METAL_TYPES[d]}* {n}" for n, d in zip(k.outputs, output_dtypes)]
    params += [f"uint3 {a}" for a in ("thread_position_in_threadgroup", "threadgroup_position_in_grid",
                                      "threads_per_threadgroup")]
    return (METAL_STUB + header + f"void {k.name}({', '.join(params)}) {{\n"
            + _template_lines(template, METAL_TYPES) + body + "\n}\n")


def _compile(source: str, shared: bool) -> Path:
    if CXX is None:
        raise RuntimeError("no C++ compiler (g++ or clang++) on PATH: kernel sources cannot be checked")
    BUILD_DIR.mkdir(exist_ok=True)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    src, lib = BUILD_DIR / f"{digest}.cpp", BUILD_DIR / f"{digest}.so"
    if not lib.exists():
        src.write_text(source)
        flags = ["-shared", "-fPIC", "-O1", "-pthread"] if shared else ["-fsyntax-only"]
        result = subprocess.run([CXX, "-std=c++20", "-w", *flags, str(src), "-o", str(lib)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"kernel source does not compile:\n{result.stderr[:4000]}")
        if not shared:
            lib.write_text("ok")
    return lib


def check_metal(k, inputs, template, output_dtypes):
    _compile(metal_source(k, inputs, template, output_dtypes), shared=False)


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype in NUMPY_VIEW:
        return np.ascontiguousarray(np.array(a.view(NUMPY_VIEW[a.dtype][0])))
    return np.ascontiguousarray(np.array(a))


def emulated_launch(self, backend_name, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
    """`Kernel.launch` on the CPU (both flavours compiled; the CUDA one run)."""
    inputs = [mx.array(a) if not isinstance(a, mx.array) else a for a in inputs]
    mx.eval(inputs)
    if "metal" in self.backends:
        check_metal(self, inputs, template, output_dtypes)
    lib = ctypes.CDLL(str(_compile(cuda_source(self, inputs, template, output_dtypes), shared=True)))
    host_in = [_to_numpy(a) for a in inputs]
    host_out = [np.zeros(s, dtype=NUMPY_VIEW[d][1] if d in NUMPY_VIEW else np.dtype(str(d).split(".")[-1]))
                for s, d in zip(output_shapes, output_dtypes)]
    pointers = (ctypes.c_void_p * (len(host_in) + len(host_out)))(*[b.ctypes.data for b in host_in + host_out])
    grid, threadgroup = tuple(grid) + (1,) * (3 - len(grid)), tuple(threadgroup) + (1,) * (3 - len(threadgroup))
    assert threadgroup[1] == threadgroup[2] == 1, "kernels use 1-d thread groups"
    assert all(g % t == 0 for g, t in zip(grid, threadgroup)), "grid must be whole groups"
    lib.k_launch(pointers, grid[0] // threadgroup[0], grid[1], grid[2], threadgroup[0])
    outs = []
    for b, d in zip(host_out, output_dtypes):
        a = mx.array(b)
        outs.append(a.view(d) if d in NUMPY_VIEW else a)
    return outs


def emulate(monkeypatch):
    """Route every kernel launch through the CPU emulator for the rest of the test. A kernel that fails (its
    source does not compile, its launch raises) fails the test instead of falling back to its reference."""
    monkeypatch.setattr(backend.Kernel, "launch", emulated_launch)
    monkeypatch.setattr(backend, "backend", lambda: "cuda")
    monkeypatch.setattr(backend, "_enabled", True)
    fail_on_fallback(monkeypatch)


def fail_on_fallback(monkeypatch):
    """A kernel that fails to build (logged, and its reference run, for users) fails the test instead."""
    def no_fallback(message, *args):
        raise AssertionError(message % args)

    monkeypatch.setattr(backend.log, "warning", no_fallback)


def references_for(monkeypatch, names):
    """The kernels whose name `names(name)` accepts run their pure-MLX reference instead, from now on."""
    run = backend.Kernel.run
    monkeypatch.setattr(backend.Kernel, "run", lambda self, *args, **kwargs: kwargs["reference"]()
                        if names(self.name) else run(self, *args, **kwargs))


def record_launches(monkeypatch):
    """Names of the kernels launched from now on (through the launch installed now), as a list."""
    names = []
    launch = backend.Kernel.launch

    def spy(self, *args, **kwargs):
        names.append(self.name)
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(backend.Kernel, "launch", spy)
    return names
