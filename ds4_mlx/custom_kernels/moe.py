"""Routed experts for decode (a few tokens): two launches that read each picked expert's
quantized weights once, straight from the packed layout.

- `moe_gate_up_<mode>`, grid (INTER / (warps * RA) groups, N * K slots): group (b, slot) stages
  its token's x in shared memory as float (word-major: element j of word w at xs[j * WPR + w], so
  the 32 lanes, which read 32 consecutive weight words, read 32 consecutive floats), then each
  warp computes RA rows of w1 and of w3 of the slot's expert (lane l reads words l, l + 32, ...:
  coalesced), fp32 dot products, rounds gate and up to the activation dtype (as the quantized
  matmul of the reference does), applies the clamped SwiGLU in fp32, multiplies by the route
  weight and writes hidden[slot, row] in the activation dtype.
- `moe_down_<mode>`, grid (DIM / (warps * RB) groups, N tokens): group (b, n) stages the K hidden
  rows of token n (word-major; bf16 as packed pairs of bf16 bits, other dtypes as float), then
  each warp walks the words once for all K experts' RB rows (K * RB independent loads per step,
  no synchronisation until the end), reduces each (expert, row) dot over the warp, rounds it to
  the activation dtype like the reference's per-expert down product, and sums the K results in
  fp32 (expert order): out [N, DIM] fp32.

Dequantization: affine (2, 4, 8 bits; groups 32/64/128): w = s * q + b per group; a word's dot is
s * sum(q_j x_j) + b * sum(x_j), with sum(x_j) precomputed per word. A code q at bit p*BITS of
a 16-bit half word becomes a float without an int-to-float conversion: the bits
(word & (MASK << p*BITS)) | 0x4B000000 are the float 2^23 + q * 2^(p*BITS), minus 2^23 exactly,
and x is staged pre-multiplied by 2^(-p*BITS) (exact power-of-two scaling). mxfp4 (group 32):
e2m1 codes through a 16-entry table in shared memory, times 2^(e - 127) built from the E8M0 bits.

Staging a token's x / the K hidden rows (from L2) costs far less than the weight rows each group
streams (16 rows per group by default). Experts picked by several tokens are read once per token (from
L2 the second time when their groups run together). The pure-MLX reference
(`layers.moe.routed_experts_reference`) runs for other quantization modes, unquantized weights,
more than MAX_TOKENS tokens (prefill: gather_qmm, or moe_prefill's grouped tensor-core products for
affine experts on CUDA), without a GPU backend, or when a kernel fails
to build.

The shared expert (mxfp8, as every recipe keeps the checkpoint's FP8 linears) joins the same two launches
(`experts`): N more gate/up slots read its w1 / w3, and each down group adds its w2 rows' product after the K
routed ones, rounding where the reference rounds (its products to the activation dtype, then routed sum +
shared rounded once): this saves the shared expert's three quantized products, its SwiGLU and the sum (five
launches per layer). Where it does not fit (the down kernel stages one more hidden row, 4 KB in bf16 at Flash
shapes: Metal's 32 KB of threadgroup memory holds it for q2 and native, not for q4) the routed kernels run alone
and the shared expert with MLX.
"""

from typing import NamedTuple, Optional

import mlx.core as mx

from . import backend, moe_prefill
from ..layers import moe as layer

MAX_TOKENS = 8  # at most this many tokens take the kernels; more (prefill) use gather_qmm
# geometry: warps per group and rows per warp (16 rows per group: 768 gate/up groups and 256 down
# groups per token at Flash shapes, k = 6)
GATE_UP_WARPS, GATE_UP_ROWS = 8, 2
DOWN_WARPS, DOWN_ROWS = 8, 2
SHARED_BYTES = {"cuda": 48 * 1024, "metal": 32 * 1024}  # static shared / threadgroup memory per group
AFFINE_BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)
FLOAT_TYPES = (mx.bfloat16, mx.float16, mx.float32)

HEADER = """
INLINE float moe_f32(uint32_t u) {
  union { uint32_t u; float f; } c;
  c.u = u;
  return c.f;
}
INLINE uint32_t moe_bits(float f) {
  union { uint32_t u; float f; } c;
  c.f = f;
  return c.u;
}
// 2^e for -126 <= e <= 127
INLINE float moe_pow2(int e) { return moe_f32(uint32_t(e + 127) << 23); }
// E8M0 scale: 2^(s - 127) (s = 0: 2^-127)
INLINE float moe_e8m0(uint32_t s) { return s == 0u ? 0.5f * moe_f32(1u << 23) : moe_f32(s << 23); }
// FP8 e4m3 code (bits 0-7): 2^(e - 7) * (1 + m / 8), subnormal m * 2^-9 (weights hold no NaN codes)
INLINE float moe_e4m3(uint32_t b) {
  const uint32_t e = (b >> 3) & 15u;
  const uint32_t m = b & 7u;
  const float mag = e != 0u ? moe_f32(((e + 120u) << 23) | (m << 20))
                            : (moe_f32(m | 0x4B000000u) - 8388608.0f) * 0.001953125f;
  return (b & 128u) != 0u ? -mag : mag;
}
"""

# Per mode: constants, staging pre-factor of element j of a word, and the dot product of one
# packed word `q` (group index `gi`) with the staged xv[EPW] added to `ACC`.
_AFFINE = {
    "consts": """
constexpr int EPW = 32 / BITS;
constexpr int HALF = EPW / 2;
constexpr uint32_t MASK = (1u << BITS) - 1u;
""",
    "prescale": "moe_pow2(-BITS * (j % HALF))",
    "shared": "SHARED float xsum[@XSUM@];",
    "setup": "",
    "sum": "xsum[@AT@] = total;",
    "load_sum": "const float xw = xsum[@AT@];",
    "dot": """{
      const uint32_t q = @W@[wi];
      const uint32_t qh = q >> 16;
      float d = 0.0f;
#pragma unroll
      for (int p = 0; p < HALF; ++p) {
        d += (moe_f32((q & (MASK << (BITS * p))) | 0x4B000000u) - 8388608.0f) * xv[p];
        d += (moe_f32((qh & (MASK << (BITS * p))) | 0x4B000000u) - 8388608.0f) * xv[HALF + p];
      }
      @ACC@ += static_cast<float>(@S@[gi]) * d + static_cast<float>(@B@[gi]) * xw;
    }""",
}

_MXFP4 = {
    "consts": """
constexpr int EPW = 8;
""",
    "prescale": "1.0f",
    "shared": "SHARED float lut[16];",
    "setup": """
if (TID < 16u) {
  const float e2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  lut[TID] = (TID & 8u) ? -e2m1[TID & 7u] : e2m1[TID & 7u];
}
""",
    "sum": "",
    "load_sum": "",
    "dot": """{
      const uint32_t q = @W@[wi];
      float d = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) d += lut[(q >> (4 * j)) & 15u] * xv[j];
      @ACC@ += moe_e8m0(static_cast<uint32_t>(@S@[gi])) * d;
    }""",
}

# the shared expert's format (the checkpoint's FP8 linears, kept as mxfp8 by every quantizing recipe)
_MXFP8 = {
    "consts": """
constexpr int EPW = 4;
""",
    "prescale": "1.0f",
    "shared": "",
    "setup": "",
    "sum": "",
    "load_sum": "",
    "dot": """{
      const uint32_t q = @W@[wi];
      const float d = moe_e4m3(q & 255u) * xv[0] + moe_e4m3((q >> 8) & 255u) * xv[1] +
                      moe_e4m3((q >> 16) & 255u) * xv[2] + moe_e4m3(q >> 24) * xv[3];
      @ACC@ += moe_e8m0(static_cast<uint32_t>(@S@[gi])) * d;
    }""",
}

MODES = {"affine": _AFFINE, "mxfp4": _MXFP4, "mxfp8": _MXFP8}
ROUTED_MODES = ("affine", "mxfp4")  # the routed experts' formats the kernels read
SHARED_MODE = "mxfp8"


def _dot(mode, acc, w, s, b):
    return backend.fill(MODES[mode]["dot"], ACC=acc, W=w, S=s, B=b)


def _part(mode: str, group_size: str, code: str, **names) -> str:
    """A kernel part for one weight set in `mode`, in its own scope: the mode's word constants, words per row
    (WPR) of a row of ROW_LEN inputs, quantization groups per row (GPR), words per group (WPG)."""
    consts = MODES[mode]["consts"] + """
constexpr int WPR = @ROW_LEN@ / EPW;  // words per weight row
constexpr int GPR = @ROW_LEN@ / @GS@;  // quantization groups per row
constexpr int WPG = @GS@ / EPW;  // words per group
"""
    return "{\n" + backend.fill(consts + code, GS=group_size, **names) + "}\n"


_GATE_UP_PART = """
const uint n = @TOKEN@;
const uint e = @EXPERT@;
for (uint w = TID; w < uint(WPR); w += uint(NT)) {
  float total = 0.0f;
  for (int j = 0; j < EPW; ++j) {
    const float v = static_cast<float>(x[n * uint(DIM) + w * uint(EPW) + uint(j)]);
    total += v;
    xs[uint(j) * uint(WPR) + w] = v * @PRESCALE@;
  }
  @STORE_SUM@
}
BARRIER();
float g[RA];
float u[RA];
for (int r = 0; r < RA; ++r) {
  g[r] = 0.0f;
  u[r] = 0.0f;
}
#pragma unroll 4
for (int i = 0; i < (WPR + 31) / 32; ++i) {
  const uint w = LANE + 32u * uint(i);
  if (WPR % 32 == 0 || w < uint(WPR)) {
    float xv[EPW];
    for (int j = 0; j < EPW; ++j) xv[j] = xs[uint(j) * uint(WPR) + w];
    @LOAD_SUM@
    for (int r = 0; r < RA; ++r) {
      const uint row = e * uint(INTER) + row0 + uint(r);
      const uint wi = row * uint(WPR) + w;
      const uint gi = row * uint(GPR) + w / uint(WPG);
      @DOT1@
      @DOT3@
    }
  }
}
for (int r = 0; r < RA; ++r) {
  const float gsum = WARP_SUM(g[r]);
  const float usum = WARP_SUM(u[r]);
  if (LANE == 0u) {
    // the reference's gate / up products come out of the quantized matmul in the activation dtype
    float gv = static_cast<float>(static_cast<T>(gsum));
    float uv = static_cast<float>(static_cast<T>(usum));
    if (CLAMP) {
      gv = FMIN(gv, limit);
      uv = FMAX(FMIN(uv, limit), -limit);
    }
    const float h = ((gv * (1.0f / (1.0f + EXP(-gv)))) * uv) * @ROUTE@;
    hidden[slot * uint(INTER) + row0 + uint(r)] = static_cast<T>(h);
  }
}
"""


def _gate_up_part(mode: str, group_size: str, weights, token: str, expert: str, route: str) -> str:
    """Slot `slot` of the gate/up kernel through one weight set: stage token `token`'s x, then RA rows of w1 and w3
    of expert `expert` per warp, the clamped SwiGLU times `route` into hidden[slot]."""
    m, (w1, s1, b1, w3, s3, b3) = MODES[mode], weights
    return _part(mode, group_size, _GATE_UP_PART, ROW_LEN="DIM", TOKEN=token, EXPERT=expert, ROUTE=route,
                 PRESCALE=m["prescale"], STORE_SUM=backend.fill(m["sum"], AT="w"),
                 LOAD_SUM=backend.fill(m["load_sum"], AT="w"),
                 DOT1=_dot(mode, "g[r]", w1, s1, b1), DOT3=_dot(mode, "u[r]", w3, s3, b3))


def _gate_up_body(mode: str, with_shared: bool) -> str:
    """Group (b, slot): slots below ROUTED are (token, routed expert) pairs, the shared kernel's further
    slots the tokens' shared-expert rows (mxfp8)."""
    body = """
constexpr int NW = NT / 32;
SHARED float xs[DIM];
""" + backend.fill(MODES[mode]["shared"], XSUM="DIM * BITS / 32") + MODES[mode]["setup"] + """
const uint slot = GROUP_Y;
const uint row0 = (GROUP_X * uint(NW) + WARP) * uint(RA);
const float limit = params[0];
"""
    routed = _gate_up_part(mode, "GS", ("w1", "s1", "b1", "w3", "s3", "b3"), "slot / uint(K)",
                           "static_cast<uint>(inds[slot])", "static_cast<float>(rw[slot])")
    if not with_shared:
        return body + routed
    shared = _gate_up_part(SHARED_MODE, "32", ("sw1", "ss1", "", "sw3", "ss3", ""), "slot - uint(ROUTED)", "0u",
                           "1.0f")
    return body + "if (slot < uint(ROUTED)) " + routed + "else " + shared


_DOWN_STAGE = """
for (uint t = TID; t < uint(@ROWS@ * WPR); t += uint(NT)) {
  const uint k = t / uint(WPR);
  const uint w = t - k * uint(WPR);
  const uint base = (@FIRST_ROW@ + k) * uint(INTER) + w * uint(EPW);
  float total = 0.0f;
  float vals[EPW];
  for (int j = 0; j < EPW; ++j) {
    const float v = static_cast<float>(hidden[base + uint(j)]);
    total += v;
    vals[j] = v * @PRESCALE@;
  }
  @STORE@
  @STORE_SUM@
}
"""
# staged hidden rows: bf16 activations as packed pairs (j, j + 1) of bf16 bits (bf16 values times powers of two:
# the low 16 bits of their floats are zero) in @HP@, other dtypes as float in @HF@; row k, word w, element j
_STORE = """
  if (PACKED) {
    for (int j = 0; j < EPW / 2; ++j)
      @HP@[(k * uint(EPW / 2) + uint(j)) * uint(WPR) + w] =
          (moe_bits(vals[2 * j]) >> 16) | (moe_bits(vals[2 * j + 1]) & 0xFFFF0000u);
  } else {
    for (int j = 0; j < EPW; ++j) @HF@[(k * uint(EPW) + uint(j)) * uint(WPR) + w] = vals[j];
  }"""
_LOAD = """
      float xv[EPW];
      if (PACKED) {
        for (int j = 0; j < EPW / 2; ++j) {
          const uint32_t pair = @HP@[(uint(@ROW@) * uint(EPW / 2) + uint(j)) * uint(WPR) + w];
          xv[2 * j] = moe_f32(pair << 16);
          xv[2 * j + 1] = moe_f32(pair & 0xFFFF0000u);
        }
      } else {
        for (int j = 0; j < EPW; ++j) xv[j] = @HF@[(uint(@ROW@) * uint(EPW) + uint(j)) * uint(WPR) + w];
      }"""

_DOWN_ROUTED = """
#pragma unroll 2
for (int i = 0; i < (WPR + 31) / 32; ++i) {
  const uint w = LANE + 32u * uint(i);
  if (WPR % 32 == 0 || w < uint(WPR)) {
    for (int k = 0; k < K; ++k) {
      @LOAD@
      @LOAD_SUM@
      for (int r = 0; r < RB; ++r) {
        const uint row = ex[k] * uint(DIM) + row0 + uint(r);
        const uint wi = row * uint(WPR) + w;
        const uint gi = row * uint(GPR) + w / uint(WPG);
        @DOT2@
      }
    }
  }
}
"""
_DOWN_SHARED = """
for (int i = 0; i < (WPR + 31) / 32; ++i) {
  const uint w = LANE + 32u * uint(i);
  if (WPR % 32 == 0 || w < uint(WPR)) {
    @LOAD@
    for (int r = 0; r < RB; ++r) {
      const uint row = row0 + uint(r);
      const uint wi = row * uint(WPR) + w;
      const uint gi = row * uint(GPR) + w / uint(WPG);
      @DOT2@
    }
  }
}
"""


def _down_body(mode: str, with_shared: bool) -> str:
    """Group (b, n): token n's K routed rows of hidden (and, in the shared kernel, its shared-expert row
    ROUTED + n) staged word-major, then each warp's RB output rows."""
    m = MODES[mode]
    body = """
constexpr int NW = NT / 32;
SHARED uint32_t hp[PACKED ? K * INTER / 2 : 1];
SHARED float hf[PACKED ? 1 : K * INTER];
""" + backend.fill(m["shared"], XSUM="K * INTER * BITS / 32")
    if with_shared:  # its hidden row, staged as the routed ones
        body += "\nSHARED uint32_t hsp[PACKED ? INTER / 2 : 1];\nSHARED float hsf[PACKED ? 1 : INTER];\n"
    body += m["setup"] + """
const uint n = GROUP_Y;
const uint row0 = (GROUP_X * uint(NW) + WARP) * uint(RB);
"""
    body += _part(mode, "GS", _DOWN_STAGE, ROW_LEN="INTER", ROWS="K", FIRST_ROW="n * uint(K)",
                  PRESCALE=m["prescale"], STORE=backend.fill(_STORE, HP="hp", HF="hf"),
                  STORE_SUM=backend.fill(m["sum"], AT="t"))
    if with_shared:
        body += _part(SHARED_MODE, "32", _DOWN_STAGE, ROW_LEN="INTER", ROWS="1", FIRST_ROW="uint(ROUTED) + n",
                      PRESCALE="1.0f", STORE=backend.fill(_STORE, HP="hsp", HF="hsf"), STORE_SUM="")
    body += """BARRIER();
uint ex[K];
for (int k = 0; k < K; ++k) ex[k] = static_cast<uint>(inds[n * uint(K) + uint(k)]);
// all K experts' rows in one pass over the words (many independent loads in flight), one
// accumulator per (expert, row), reduced over the warp at the end
float acc[K * RB];
for (int a = 0; a < K * RB; ++a) acc[a] = 0.0f;
"""
    body += _part(mode, "GS", _DOWN_ROUTED, ROW_LEN="INTER", LOAD=backend.fill(_LOAD, HP="hp", HF="hf", ROW="k"),
                  LOAD_SUM=backend.fill(m["load_sum"], AT="uint(k) * uint(WPR) + w"),
                  DOT2=_dot(mode, "acc[k * RB + r]", "w2", "s2", "b2"))
    body += """// the reference's per-expert down products come out in the activation dtype; summed in fp32
float tot[RB];
for (int r = 0; r < RB; ++r) tot[r] = 0.0f;
for (int k = 0; k < K; ++k)
  for (int r = 0; r < RB; ++r) tot[r] += static_cast<float>(static_cast<T>(WARP_SUM(acc[k * RB + r])));
"""
    if with_shared:
        body += "float accs[RB];\nfor (int r = 0; r < RB; ++r) accs[r] = 0.0f;\n"
        body += _part(SHARED_MODE, "32", _DOWN_SHARED, ROW_LEN="INTER",
                      LOAD=backend.fill(_LOAD, HP="hsp", HF="hsf", ROW="0"),
                      DOT2=_dot(SHARED_MODE, "accs[r]", "sw2", "ss2", ""))
        body += """// then the shared expert's down product (activation dtype) added; the total rounded once
for (int r = 0; r < RB; ++r) tot[r] += static_cast<float>(static_cast<T>(WARP_SUM(accs[r])));
"""
    return body + """if (LANE == 0u) {
  for (int r = 0; r < RB; ++r) out[n * uint(DIM) + row0 + uint(r)] = static_cast<@OUT@>(tot[r]);
}
""".replace("@OUT@", "T" if with_shared else "float")


def _inputs(mode, names):
    return [n for n in names if mode == "affine" or not n.startswith("b")]


_GATE_UP_INPUTS = ["x", "w1", "s1", "b1", "w3", "s3", "b3", "inds", "rw", "params"]
_DOWN_INPUTS = ["hidden", "w2", "s2", "b2", "inds"]
GATE_UP = {mode: backend.kernel(f"moe_gate_up_{mode}", _inputs(mode, _GATE_UP_INPUTS), ["hidden"],
                                _gate_up_body(mode, False), HEADER) for mode in ROUTED_MODES}
DOWN = {mode: backend.kernel(f"moe_down_{mode}", _inputs(mode, _DOWN_INPUTS), ["out"], _down_body(mode, False),
                             HEADER) for mode in ROUTED_MODES}
# with the shared expert (mxfp8) in the same launches: its rows after the routed ones
GATE_UP_SHARED = {mode: backend.kernel(f"moe_gate_up_shared_{mode}",
                                       _inputs(mode, _GATE_UP_INPUTS) + ["sw1", "ss1", "sw3", "ss3"], ["hidden"],
                                       _gate_up_body(mode, True), HEADER) for mode in ROUTED_MODES}
DOWN_SHARED = {mode: backend.kernel(f"moe_down_shared_{mode}", _inputs(mode, _DOWN_INPUTS) + ["sw2", "ss2"], ["out"],
                                    _down_body(mode, True), HEADER) for mode in ROUTED_MODES}


class Format(NamedTuple):
    mode: str
    bits: int
    group_size: int


def weight_format(linear, out_dims: int, in_dims: int, experts: int) -> Optional[Format]:
    """The format of a stacked quantized linear [experts, out_dims, in_dims] the kernels read, or None."""
    mode, bits, gs = getattr(linear, "mode", None), getattr(linear, "bits", None), getattr(linear, "group_size", None)
    if getattr(linear, "scales", None) is None or getattr(linear, "global_scale", None) is not None or "bias" in linear:
        return None
    if mode == "affine":
        if bits not in AFFINE_BITS or gs not in GROUP_SIZES or linear.get("biases") is None:
            return None
    elif mode != "mxfp4" or bits != 4 or gs != 32:
        return None
    if (in_dims % gs or tuple(linear.weight.shape) != (experts, out_dims, in_dims * bits // 32)
            or linear.weight.dtype != mx.uint32 or tuple(linear.scales.shape) != (experts, out_dims, in_dims // gs)
            or linear.weight.size >= 2**32 or linear.scales.size >= 2**32):
        return None
    if mode == "affine" and (linear.scales.dtype not in FLOAT_TYPES or linear.biases.dtype not in FLOAT_TYPES
                             or tuple(linear.biases.shape) != tuple(linear.scales.shape)):
        return None
    return Format(mode, bits, gs)


def _geometry(rows: int, warps: int, per_warp: int):
    """(warps, rows per warp) giving a whole number of groups, the configured geometry if it fits."""
    for w in (warps, 4, 2, 1):
        for r in (per_warp, 2, 1):
            if w <= warps and r <= per_warp and rows % (w * r) == 0:
                return w, r
    return None


def _shared_limit() -> int:
    return SHARED_BYTES.get(backend.backend(), 32 * 1024)


def gate_up(x: mx.array, weights: mx.array, indices: mx.array, w1, w3, fmt: Format, limit: float, shared=None):
    """hidden [N * k, inter] in x's dtype: the route weight times the clamped SwiGLU of expert
    indices[n, j]'s gate and up products with x[n] (row n * k + j); with `shared` (the shared expert, mxfp8:
    shared_applies) N more rows, token n's shared-expert SwiGLU at row N * k + n. None where the kernel does not
    run (no backend, geometry or shared memory out of range, build failure)."""
    (n_tokens, dim), k = x.shape, indices.shape[1]
    inter = w1.weight.shape[1]
    geometry = _geometry(inter, GATE_UP_WARPS, GATE_UP_ROWS)
    if backend.backend() is None or geometry is None or dim * 4 + dim * fmt.bits // 32 * 4 + 64 > _shared_limit():
        return None
    warps, rows = geometry
    affine = fmt.mode == "affine"
    ins = [x, w1.weight, w1.scales] + ([w1.biases] if affine else []) + [w3.weight, w3.scales]
    ins += ([w3.biases] if affine else []) + [indices.reshape(-1), weights.reshape(-1), backend.float_input(limit)]
    template = [("T", x.dtype), ("BITS", fmt.bits), ("GS", fmt.group_size), ("DIM", dim), ("INTER", inter), ("K", k),
                ("NT", 32 * warps), ("RA", rows), ("CLAMP", bool(limit > 0))]
    slots, kernel = n_tokens * k, GATE_UP[fmt.mode]
    if shared is not None:
        ins += [shared.w1.weight, shared.w1.scales, shared.w3.weight, shared.w3.scales]
        template.append(("ROUTED", slots))
        slots, kernel = slots + n_tokens, GATE_UP_SHARED[fmt.mode]
    out = kernel.run(ins, template, grid=(inter // (warps * rows) * 32 * warps, slots, 1),
                     threadgroup=(32 * warps, 1, 1), output_shapes=[(slots, inter)], output_dtypes=[x.dtype],
                     reference=lambda: None)
    return None if out is None else out[0]


def down_bytes(k: int, inter: int, fmt: Format, packed: bool, shared) -> int:
    """Shared / threadgroup memory of a down group: the k hidden rows (bf16 pairs if `packed`, else float), the
    affine word sums or mxfp4's table, and the shared expert's row with `shared`."""
    row = inter * (2 if packed else 4)
    sums = k * inter * fmt.bits // 32 * 4 if fmt.mode == "affine" else 0
    return k * row + sums + 64 + (row if shared is not None else 0)


def down(hidden: mx.array, indices: mx.array, w2, fmt: Format, shared=None):
    """out [N, dim] fp32: sum over j of expert indices[n, j]'s down product of hidden[n * k + j]
    (each rounded to hidden's dtype first); with `shared` (gate_up's rows with the shared expert), plus the shared
    expert's down product of hidden[N * k + n] (rounded to hidden's dtype), the total rounded to hidden's dtype.
    None where the kernel does not run."""
    n_tokens, k = indices.shape
    dim, inter = w2.weight.shape[1], hidden.shape[-1]
    geometry = _geometry(dim, DOWN_WARPS, DOWN_ROWS)
    packed = hidden.dtype == mx.bfloat16  # other activation dtypes are staged as float
    if backend.backend() is None or geometry is None or down_bytes(k, inter, fmt, packed, shared) > _shared_limit():
        return None
    warps, rows = geometry
    ins = [hidden, w2.weight, w2.scales] + ([w2.biases] if fmt.mode == "affine" else []) + [indices.reshape(-1)]
    template = [("T", hidden.dtype), ("PACKED", packed), ("BITS", fmt.bits), ("GS", fmt.group_size), ("DIM", dim),
                ("INTER", inter), ("K", k), ("NT", 32 * warps), ("RB", rows)]
    kernel, dtype = DOWN[fmt.mode], mx.float32
    if shared is not None:
        ins += [shared.w2.weight, shared.w2.scales]
        template.append(("ROUTED", n_tokens * k))
        kernel, dtype = DOWN_SHARED[fmt.mode], hidden.dtype
    out = kernel.run(ins, template, grid=(dim // (warps * rows) * 32 * warps, n_tokens, 1),
                     threadgroup=(32 * warps, 1, 1), output_shapes=[(n_tokens, dim)], output_dtypes=[dtype],
                     reference=lambda: None)
    return None if out is None else out[0]


def formats(x: mx.array, weights: mx.array, indices: mx.array, w1, w2, w3):
    """(format of w1 and w3, format of w2) where the kernels apply to these inputs, else None."""
    if x.ndim != 2 or indices.ndim != 2 or x.dtype not in FLOAT_TYPES or weights.dtype not in FLOAT_TYPES:
        return None
    (n_tokens, dim), k = x.shape, indices.shape[1]
    if (not 0 < n_tokens <= MAX_TOKENS or tuple(indices.shape) != (n_tokens, k) or tuple(weights.shape) != (n_tokens, k)
            or indices.dtype not in (mx.int32, mx.uint32)):
        return None
    weight = getattr(w1, "weight", None)
    if weight is None or weight.ndim != 3:
        return None
    experts, inter = weight.shape[0], weight.shape[1]
    f13, f2 = weight_format(w1, inter, dim, experts), weight_format(w2, dim, inter, experts)
    if f13 is None or f2 is None or weight_format(w3, inter, dim, experts) != f13:
        return None
    return f13, f2


def routed_experts(x: mx.array, weights: mx.array, indices: mx.array, w1, w2, w3, limit: float,
                   fp8_activations: bool) -> mx.array:
    """x [N, dim], route weights / expert indices [N, k] -> sum over k of weight * expert(x),
    fp32 [N, dim], as `layer.routed_experts_reference` (which runs where the kernels do not)."""

    def reference():
        return layer.routed_experts_reference(x, weights, indices, w1, w2, w3, limit, fp8_activations)

    name = backend.backend()
    if name == "cuda" and moe_prefill.applies(x, indices, w1, w2, w3):
        return moe_prefill.routed_experts(x, weights, indices, w1, w2, w3, limit, fp8_activations)
    fmts = None if name is None else formats(x, weights, indices, w1, w2, w3)
    out = None if fmts is None else _two_launches(x, weights, indices, w1, w2, w3, fmts, limit, fp8_activations)
    return reference() if out is None else out


def _two_launches(x, weights, indices, w1, w2, w3, fmts, limit, fp8_activations, shared=None):
    """gate_up, the hidden rows' FP8 round trip where the model simulates FP8 activations, then down (with the
    shared expert's rows where `shared` is given); None where a kernel does not run."""
    hidden = gate_up(x, weights, indices, w1, w3, fmts[0], limit, shared)
    if hidden is None:
        return None
    if fp8_activations:
        hidden = layer.fp8_input(hidden, True)
    return down(hidden, indices, w2, fmts[1], shared)


def shared_applies(shared, dim: int, inter: int) -> bool:
    """Whether the shared expert's w1, w3 [inter, dim] and w2 [dim, inter] are mxfp8 linears the kernels read."""
    def fits(linear, out_dims, in_dims):
        return (getattr(linear, "mode", None) == SHARED_MODE and linear.bits == 8 and linear.group_size == 32
                and "bias" not in linear and linear.get("biases") is None and linear.weight.dtype == mx.uint32
                and tuple(linear.weight.shape) == (out_dims, in_dims // 4) and linear.scales.dtype == mx.uint8
                and tuple(linear.scales.shape) == (out_dims, in_dims // 32) and in_dims % 32 == 0)

    return fits(shared.w1, inter, dim) and fits(shared.w3, inter, dim) and fits(shared.w2, dim, inter)


def experts(x: mx.array, weights: mx.array, indices: mx.array, routed, shared, limit: float,
            fp8_activations: bool) -> Optional[mx.array]:
    """The MoE's routed and shared experts for a few tokens in two launches: (sum over k of weight * expert(x)
    (fp32) + shared(x)) rounded to x's dtype [N, dim], as layers.moe.MoE computes it (routed / shared: its
    RoutedExperts and SharedExpert). None where these kernels do not run (no backend, formats, build failure):
    the caller then runs routed_experts and the shared expert apart."""
    if backend.backend() is None:
        return None
    fmts = formats(x, weights, indices, routed.w1, routed.w2, routed.w3)
    if fmts is None or not shared_applies(shared, x.shape[1], routed.w1.weight.shape[1]):
        return None
    return _two_launches(x, weights, indices, routed.w1, routed.w2, routed.w3, fmts, limit, fp8_activations, shared)
