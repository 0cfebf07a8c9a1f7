"""One kernel body, two GPU backends: the macros that turn a body into CUDA or Metal, and the
dispatch that runs a kernel or falls back to the pure-MLX reference.

A kernel body uses only these names (and the kernel's own inputs, outputs and template names):
- TID, NTHREADS: the thread's index in its group and the group size (1-d groups);
  GROUP_X, GROUP_Y, GROUP_Z: the group's index in the grid; LANE, WARP: lane and index of the
  32-wide SIMD group inside the group.
- SHARED float buf[N];  BARRIER();  WARP_SUM(v), WARP_MAX(v) (called by every thread of a group).
- EXP, LOG, SQRT, RSQRT, FMAX, FMIN, RINT (nearest, ties to even), COS, SIN (full precision), NEG_INF;
  AS_UINT / AS_FLOAT (a float's
  bits and back); `static_cast` between float and the input dtypes.
- INLINE for helper functions in a kernel's header (values only, no pointers: Metal pointers need
  address spaces).
The grid is given in threads and is always a whole number of groups.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

log = logging.getLogger("ds4_mlx.kernels")

COMMON_HEADER = """
#define TID k_thread.x
#define NTHREADS k_group_size.x
#define GROUP_X k_group.x
#define GROUP_Y k_group.y
#define GROUP_Z k_group.z
#define LANE (k_thread.x & 31u)
#define WARP (k_thread.x >> 5)
"""

CUDA_HEADER = COMMON_HEADER + """
typedef unsigned int uint;  // Metal's name; NVRTC has no sys/types.h
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define INLINE __device__ __forceinline__
#define EXP(x) expf(x)
#define LOG(x) logf(x)
#define SQRT(x) sqrtf(x)
#define RSQRT(x) rsqrtf(x)
#define FMAX(a, b) fmaxf(a, b)
#define FMIN(a, b) fminf(a, b)
#define RINT(x) rintf(x)
#define COS(x) cosf(x)
#define SIN(x) sinf(x)
#define AS_UINT(x) __float_as_uint(x)
#define AS_FLOAT(u) __uint_as_float(u)
#define NEG_INF (-cuda::std::numeric_limits<float>::infinity())
__device__ __forceinline__ float k_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float k_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
#define WARP_SUM(v) k_warp_sum(v)
#define WARP_MAX(v) k_warp_max(v)
"""

CUDA_PROLOGUE = """
const uint3 k_thread = threadIdx;
const uint3 k_group = blockIdx;
const uint3 k_group_size = blockDim;
"""

METAL_HEADER = COMMON_HEADER + """
#define SHARED threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define INLINE inline
#define EXP(x) metal::exp(x)
#define LOG(x) metal::log(x)
#define SQRT(x) metal::sqrt(x)
#define RSQRT(x) metal::rsqrt(x)
#define FMAX(a, b) metal::fmax(a, b)
#define FMIN(a, b) metal::fmin(a, b)
#define RINT(x) metal::rint(x)
#define COS(x) metal::precise::cos(x)
#define SIN(x) metal::precise::sin(x)
#define AS_UINT(x) as_type<uint>(x)
#define AS_FLOAT(u) as_type<float>(u)
#define NEG_INF (-INFINITY)
#define WARP_SUM(v) simd_sum(v)
#define WARP_MAX(v) simd_max(v)
"""

METAL_PROLOGUE = """
const uint3 k_thread = thread_position_in_threadgroup;
const uint3 k_group = threadgroup_position_in_grid;
const uint3 k_group_size = threads_per_threadgroup;
"""

_enabled = os.environ.get("DS4_MLX_KERNELS", "1") != "0"


def set_enabled(enabled: bool):
    """Turn the custom kernels on or off (off: every op runs its pure-MLX reference)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def backend() -> Optional[str]:
    """"cuda", "metal", or None when ops should run their pure-MLX reference."""
    if not _enabled or mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


Template = List[Tuple[str, object]]


@dataclass
class Kernel:
    """A kernel body with its inputs, outputs and optional header of helper functions."""

    name: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    body: str
    header: str = ""
    backends: Tuple[str, ...] = ("cuda", "metal")
    _built: Dict[str, Callable] = field(default_factory=dict, repr=False)
    _checked: Dict[tuple, bool] = field(default_factory=dict, repr=False)

    def source(self, backend_name: str) -> Tuple[str, str]:
        """(header, body) as handed to MLX for `backend_name`."""
        if backend_name == "cuda":
            return CUDA_HEADER + self.header, CUDA_PROLOGUE + self.body
        return METAL_HEADER + self.header, METAL_PROLOGUE + self.body

    def _kernel(self, backend_name: str) -> Callable:
        if backend_name not in self._built:
            header, body = self.source(backend_name)
            make = mx.fast.cuda_kernel if backend_name == "cuda" else mx.fast.metal_kernel
            self._built[backend_name] = make(name=self.name, input_names=list(self.inputs),
                                             output_names=list(self.outputs), source=body, header=header)
        return self._built[backend_name]

    def launch(self, backend_name: str, inputs, template: Template, grid, threadgroup,
               output_shapes, output_dtypes) -> List[mx.array]:
        return self._kernel(backend_name)(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                                          output_shapes=output_shapes, output_dtypes=output_dtypes)

    def run(self, inputs, template: Template, grid, threadgroup, output_shapes, output_dtypes,
            reference: Callable[[], List[mx.array]]) -> List[mx.array]:
        """The kernel's outputs on the current backend, or `reference()` where there is no GPU
        backend or the kernel failed to build (logged once per kernel configuration)."""
        name = backend()
        if name not in self.backends:
            return reference()
        key = (name, tuple((k, str(v)) for k, v in template), tuple(a.dtype for a in inputs))
        if self._checked.get(key) is False:
            return reference()
        try:
            out = self.launch(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes)
            if key not in self._checked:
                mx.eval(out)  # a build error shows at the first evaluation
                self._checked[key] = True
            return out
        except Exception as error:  # noqa: BLE001: any build failure means "use the reference"
            self._checked[key] = False
            log.warning("kernel %s failed on %s (%s); using the pure-MLX path", self.name, name, error)
            return reference()


# kernel source: `total` = the sum of every thread's float `squares` over a group of NT threads, in the same order
# on every thread (SIMD sums, then the groups' partials in order); the body declares SHARED float partials[NT / 32]
GROUP_SUM = """
squares = WARP_SUM(squares);
if (LANE == 0u) partials[WARP] = squares;
BARRIER();
float total = 0.0f;
for (int w = 0; w < NT / 32; ++w) total += partials[w];
"""

FLOATS = (mx.float32, mx.bfloat16, mx.float16)  # the input dtypes the float kernels take

KERNELS: List[Kernel] = []
_FLOATS: Dict[Tuple[float, ...], mx.array] = {}


def failed() -> List[str]:
    """Names of the kernels that failed to build in this process for some configuration (their reference ran)."""
    return sorted({k.name for k in KERNELS if False in k._checked.values()})


def fill(text: str, **values) -> str:
    """Replace each @NAME@ in a kernel source template by values[NAME]."""
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    assert "@" not in text, text
    return text


def float_input(*values: float) -> mx.array:
    """Floats as one fp32 kernel input (template arguments cannot be floats), one array per tuple of values."""
    key = tuple(float(v) for v in values)
    if key not in _FLOATS:
        _FLOATS[key] = mx.array(key, dtype=mx.float32)
    return _FLOATS[key]


def kernel(name: str, inputs: Sequence[str], outputs: Sequence[str], body: str, header: str = "",
           backends: Tuple[str, ...] = ("cuda", "metal")) -> Kernel:
    """Define and register a kernel (the registry lets the tests compile every kernel). `backends`: where
    it runs (a kernel written for one backend's matrix units only: ("cuda",); elsewhere, the reference)."""
    k = Kernel(name, inputs, outputs, body, header, backends)
    KERNELS.append(k)
    return k
