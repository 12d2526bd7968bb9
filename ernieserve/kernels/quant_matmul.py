"""Weight-only int8 / int4 GEMM: ``y = x @ dequant(W)^T (+ bias)``, with the dequantization in the
GEMM's inner loop, so the bf16 weight is never materialized.

Weight layouts (what `quantize_int8` / `quantize_int4` produce, at load time):

* int8: ``qweight [N, K] int8``, symmetric, q in [-127, 127].
* int4: ``qweight [N, ceil(K / 2)] uint8``, two values per byte along K: byte j of row n holds
  k = 2j in its low nibble and k = 2j + 1 in its high nibble, each stored as q + 8 with
  q in [-7, 7] (an odd K pads its last high nibble with q = 0).
* ``scales [N, G] float32`` with ``W[n, k] = q[n, k] * scales[n, k // group_size]``; G = 1 when
  per output channel (group_size 0), else ceil(K / group_size) (the last group may be partial).

Kernel (`_weight_only_gemm_kernel`): grid (M tiles, N tiles, K splits). Each program walks its K
range in BLOCK_K steps, loads the x tile and the int8 (or packed int4) weight tile, converts the
weight to x's dtype (exact: |q| <= 127) and accumulates ``x @ q^T`` in fp32. A group-wise scale
multiplies each step's partial product (BLOCK_K divides group_size, so a step never straddles two
groups); a per-channel scale multiplies the accumulator once at the end. int4 loads x contiguously
and splits it in registers into its even and odd columns, so the low and high nibbles go to two
dots without any interleave. Nibbles become values by bit tricks (`int4_values`, shared with the
quantized MoE kernels), on GPUs in inline PTX over 4 packed bytes per 32-bit register. When
BLOCK_K divides K (EVEN_K) no load is masked along K, so the weight tile moves in 16-byte pieces
(cp.async) instead of one byte per load; weight loads never take an `other` value (a masked byte
only meets a zero activation or an output that is not stored).

Two tile policies (`choose_tiles`): decode (M <= 32, memory bound, GEMV-like) uses BLOCK_M = 16 and
splits K until the grid has about two programs per SM; the partial sums land in a
``[splits, M, N]`` fp32 workspace that each tile's last program adds up in a fixed order, in the
same launch (`kernels/split_k.py`: deterministic, no extra launches). Prefill uses large M/N
tiles and no split. Nothing reads a device value
on the host and the only allocations are the caching allocator's, so both capture in CUDA graphs.

Every kernel has its plain-torch reference here (`weight_only_matmul_ref`: dequantize then
matmul), which is also the CPU serving path. `torch._weight_int8pack_mm` and
`torch._weight_int4pack_mm` are wrapped as an alternative backend (`GemmBackend.TORCH`).
TODO(lead, GPU): measure Triton vs the torch built-ins with benchmarks/bench_quant.py at decode and
prefill shapes and make the faster one the default per shape; Triton is the default until then.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import torch

from ernieserve.kernels import split_k
from ernieserve.kernels.pdl import pdl_enabled, pdl_launch

try:
    import triton
    import triton.language as tl

    from ernieserve.kernels.pdl import pdl_wait
    from ernieserve.kernels.split_k import store_tile

    HAS_TRITON = True
except ImportError:  # CPU-only installs serve through the references
    HAS_TRITON = False

INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8  # stored nibble = q + 8
_QUANT_ROW_CHUNK = 4096  # rows quantized at once: bounds the fp32 temporaries at load time


class GemmBackend(enum.Enum):
    """Which implementation a quantized linear layer calls (`--quantization-config` "gemm_backend")."""

    AUTO = "auto"  # TRITON on CUDA tensors, REFERENCE elsewhere
    TRITON = "triton"
    TORCH = "torch"  # torch's built-in quantized GEMMs (int8pack / int4pack / _scaled_mm)
    REFERENCE = "reference"  # dequantize then matmul, plain torch: the oracle and the CPU path

    def resolve(self, device: torch.device) -> "GemmBackend":
        if self is GemmBackend.AUTO:
            return GemmBackend.TRITON if device.type == "cuda" and HAS_TRITON else GemmBackend.REFERENCE
        return self


# ---- quantization and dequantization (plain torch, at load time, on the weight's device) -----------

def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(k / group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group] fp32, zero-padded to whole groups (zeros do not change an amax)."""
    n, k = w.shape
    g = k if group_size == 0 else group_size
    pad = num_groups(k, group_size) * g - k
    w = w.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(n, -1, g)


def _quantize_symmetric(w: torch.Tensor, group_size: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (q int8 [N, K], scales fp32 [N, G]), row chunk by row chunk."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, num_groups(k, group_size), dtype=torch.float32, device=w.device)
    for start in range(0, n, _QUANT_ROW_CHUNK):
        rows = slice(start, min(n, start + _QUANT_ROW_CHUNK))
        wg = _grouped(w[rows], group_size)  # [rows, G, group]
        s = wg.abs().amax(dim=-1).clamp_min(1e-10) / qmax  # [rows, G]
        qg = torch.round(wg / s[..., None]).clamp_(-qmax, qmax)
        q[rows] = qg.flatten(1)[:, :k].to(torch.int8)
        scales[rows] = s
    return q, scales


def quantize_int8(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (qweight int8 [N, K], scales fp32 [N, G])."""
    return _quantize_symmetric(w, group_size, INT8_MAX)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] in [-7, 7] -> uint8 [N, ceil(K / 2)] (even k low nibble, odd k high)."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K / 2)] -> q int8 [N, K]."""
    low = (packed & 0xF).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack([low, high], dim=-1).flatten(1)[:, :k]


def quantize_int4(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (qweight uint8 [N, ceil(K / 2)], scales fp32 [N, G])."""
    q, scales = _quantize_symmetric(w, group_size, INT4_MAX)
    return pack_int4(q), scales


def dequantize_weight_only(qweight: torch.Tensor, scales: torch.Tensor, bits: int, k: int,
                           group_size: int) -> torch.Tensor:
    """Back to fp32 [N, K]."""
    q = unpack_int4(qweight, k) if bits == 4 else qweight
    g = k if group_size == 0 else group_size
    expanded = scales.repeat_interleave(g, dim=1)[:, :k]  # [N, K]
    return q.float() * expanded


# ---- references ---------------------------------------------------------------------------------

def weight_only_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                           group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: dequantize to fp32, matmul in fp32, round once."""
    k = x.shape[-1]
    w = dequantize_weight_only(qweight, scales, bits, k, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- Triton ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GemmTiles:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_tiles(m: int, n: int, k: int, group_size: int, device: torch.device) -> GemmTiles:
    """Decode (small M): many N tiles and split K to fill the GPU. Prefill: big tiles, no split.

    TODO(lead, GPU): tune with benchmarks/bench_quant.py; these are first guesses for H100.
    """
    if m <= 32:
        bm, bn, bk, warps, stages = 16 if m <= 16 else 32, 64, 128, 4, 4
    elif m <= 128:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if group_size:
        bk = min(bk, group_size)  # a K step must stay inside one scale group
    split = 1
    if m <= 32 and device.type == "cuda":
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        split = max(1, min(16, 2 * _num_sms(device.index or 0) // programs, triton.cdiv(k, 4 * bk)))
    return GemmTiles(bm, bn, bk, split, warps, stages)


if HAS_TRITON:

    # Inline PTX for the half types (INLINE_ASM): Triton hands it 4 packed bytes per 32-bit register
    # ($2, pack=4) and takes 4 half values back in two registers ($0, $1; two lanes each). PRMT
    # spreads bytes 0, 1 (2, 3) into the low byte of the two 16-bit lanes, one LOP3 keeps the
    # nibble and ORs in the magic exponent: 2 PRMT + 2 LOP3 per 4 bytes for the low nibbles; the
    # high ones shift the spread lanes right by 4 (2 SHF + 2 LOP3: ptxas shares the PRMTs of the
    # two asm blocks; shifting the 4 bytes before their own PRMTs measured 25 instructions more
    # per gate/up K step, static SASS).
    # Done in Triton ops instead, the values are 16-bit elements and every AND / OR / shift is a
    # 32-bit op on one of them, plus PRMTs to unpack and repack the lanes.
    def _nibble_asm(high: bool, magic: int) -> str:
        shift = "shr.u32 t0, t0, 4;\n    shr.u32 t1, t1, 4;\n    " if high else ""
        return ("{\n    .reg .b32 t<2>;\n    prmt.b32 t0, $2, 0, 0x4140;\n    prmt.b32 t1, $2, 0, 0x4342;\n    "
                f"{shift}lop3.b32 $0, t0, 0x000F000F, {magic:#x}, 0xEA;\n    "
                f"lop3.b32 $1, t1, 0x000F000F, {magic:#x}, 0xEA;\n}}")

    # magic powers, twice (two 16-bit lanes): 128.0 in bf16 (its step in [128, 256) is 1), 1024.0 in fp16
    _ASM_LOW_BF16 = tl.constexpr(_nibble_asm(False, 0x43004300))
    _ASM_HIGH_BF16 = tl.constexpr(_nibble_asm(True, 0x43004300))
    _ASM_LOW_FP16 = tl.constexpr(_nibble_asm(False, 0x64006400))
    _ASM_HIGH_FP16 = tl.constexpr(_nibble_asm(True, 0x64006400))

    @triton.jit
    def int4_biased(byte, DTYPE: tl.constexpr, INLINE_ASM: tl.constexpr = False):
        """Packed bytes (uint8, q + 8 per nibble) -> (low, high) nibbles as MAGIC + q + 8 in DTYPE,
        exactly (MAGIC 128 for bf16, 1024 for fp16, 2^23 for fp32).

        No int -> float converts (a quarter-rate instruction). INLINE_ASM (half types, compiled
        code only: the interpreter cannot run inline asm) works on 4 packed bytes per 32-bit
        register; without it the same bit trick runs as Triton ops, per element.
        """
        if DTYPE == tl.float32:
            b = byte.to(tl.int32)
            low = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            high = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True)
        elif INLINE_ASM:
            if DTYPE == tl.float16:
                low = tl.inline_asm_elementwise(_ASM_LOW_FP16, "=r,=r,r", [byte], dtype=tl.float16, is_pure=True,
                                                pack=4)
                high = tl.inline_asm_elementwise(_ASM_HIGH_FP16, "=r,=r,r", [byte], dtype=tl.float16, is_pure=True,
                                                 pack=4)
            else:
                low = tl.inline_asm_elementwise(_ASM_LOW_BF16, "=r,=r,r", [byte], dtype=tl.bfloat16, is_pure=True,
                                                pack=4)
                high = tl.inline_asm_elementwise(_ASM_HIGH_BF16, "=r,=r,r", [byte], dtype=tl.bfloat16,
                                                 is_pure=True, pack=4)
        elif DTYPE == tl.float16:
            b = byte.to(tl.int16)
            low = ((b & 0xF) | 0x6400).to(tl.float16, bitcast=True)
            high = ((b >> 4) | 0x6400).to(tl.float16, bitcast=True)
        else:  # bfloat16
            b = byte.to(tl.int16)
            low = ((b & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
            high = ((b >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        return low, high

    @triton.jit
    def int4_values(byte, DTYPE: tl.constexpr, INLINE_ASM: tl.constexpr = False):
        """Packed bytes (uint8, q + 8 per nibble) -> (low, high) nibbles as q in DTYPE, exactly:
        `int4_biased` minus its offset, the magic power plus 8 (half types: one packed HADD2 per
        two values; the literal keeps the subtraction in DTYPE)."""
        low, high = int4_biased(byte, DTYPE, INLINE_ASM)
        if DTYPE == tl.float32:
            low, high = low - 8388616.0, high - 8388616.0
        elif DTYPE == tl.float16:
            low, high = low - 1032.0, high - 1032.0
        else:
            low, high = low - 136.0, high - 136.0
        return low, high

    # fp32 values for the CUDA-core GEMVs (kernels/gemv.py, layers/moe/moe_gemv.py), where the
    # conversion, not the multiply, decides the speed: on sm_90 integer and logic ops issue at half
    # the fp32 rate and I2F at an eighth, and the half-type route above costs one more integer op
    # per value to widen bf16 to fp32 (ptxas: ~9 fp32-op equivalents per int4 value, the kernels
    # ALU-bound at twice their read time). Here, per 4 packed bytes (one register, pack=4):
    # int4: each nibble is masked in place and the exponent of 2^23 ORed in (one LOP3: 2^23 + s n for
    # the nibble's place value s = 16^i, up to 2^16 while it stays inside the mantissa; the top
    # half is shifted down once), then one FFMA by 1/s minus 2^23 / s + 8 leaves q exactly (every
    # step is a power-of-two scaling or an exact integer): 8 LOP3, 1 SHR, 8 FFMA per 8 values.
    # int8: q + 128 per byte by one XOR of the sign bits, each byte placed under 2^23's exponent by
    # one PRMT, minus 2^23 + 128 by one FADD: 1 XOR, 4 PRMT, 4 FADD per 4 values.
    _ASM_INT4_LOW_F32 = tl.constexpr(
        "{\n    .reg .b32 t, d<4>;\n    shr.u32 t, $4, 16;\n"
        "    lop3.b32 d0, $4, 0x0000000F, 0x4B000000, 0xEA;\n"
        "    lop3.b32 d1, $4, 0x00000F00, 0x4B000000, 0xEA;\n"
        "    lop3.b32 d2, $4, 0x000F0000, 0x4B000000, 0xEA;\n"
        "    lop3.b32 d3, t, 0x00000F00, 0x4B000000, 0xEA;\n"
        "    add.f32 $0, d0, 0fCB000008;\n"  # - (2^23 + 8)
        "    fma.rn.f32 $1, d1, 0f3B800000, 0fC7000800;\n"  # / 256 - (2^15 + 8)
        "    fma.rn.f32 $2, d2, 0f37800000, 0fC3080000;\n"  # / 65536 - (2^7 + 8)
        "    fma.rn.f32 $3, d3, 0f3B800000, 0fC7000800;\n}")
    _ASM_INT4_HIGH_F32 = tl.constexpr(
        "{\n    .reg .b32 t, d<4>;\n    shr.u32 t, $4, 16;\n"
        "    lop3.b32 d0, $4, 0x000000F0, 0x4B000000, 0xEA;\n"
        "    lop3.b32 d1, $4, 0x0000F000, 0x4B000000, 0xEA;\n"
        "    lop3.b32 d2, t, 0x000000F0, 0x4B000000, 0xEA;\n"
        "    lop3.b32 d3, t, 0x0000F000, 0x4B000000, 0xEA;\n"
        "    fma.rn.f32 $0, d0, 0f3D800000, 0fC9000080;\n"  # / 16 - (2^19 + 8)
        "    fma.rn.f32 $1, d1, 0f39800000, 0fC5008000;\n"  # / 4096 - (2^11 + 8)
        "    fma.rn.f32 $2, d2, 0f3D800000, 0fC9000080;\n"
        "    fma.rn.f32 $3, d3, 0f39800000, 0fC5008000;\n}")
    _ASM_INT8_F32 = tl.constexpr(
        "{\n    .reg .b32 u, d<4>;\n    xor.b32 u, $4, 0x80808080;\n"
        "    prmt.b32 d0, u, 0x4B000000, 0x7440;\n    prmt.b32 d1, u, 0x4B000000, 0x7441;\n"
        "    prmt.b32 d2, u, 0x4B000000, 0x7442;\n    prmt.b32 d3, u, 0x4B000000, 0x7443;\n"
        "    add.f32 $0, d0, 0fCB000080;\n    add.f32 $1, d1, 0fCB000080;\n"  # - (2^23 + 128)
        "    add.f32 $2, d2, 0fCB000080;\n    add.f32 $3, d3, 0fCB000080;\n}")

    @triton.jit
    def int4_values_f32(byte, INLINE_ASM: tl.constexpr = False):
        """Packed bytes (uint8, q + 8 per nibble) -> (low, high) nibbles as q in float32, exactly
        (compiled: the PTX above; the interpreter: `int4_values`' Triton ops)."""
        if INLINE_ASM:
            low = tl.inline_asm_elementwise(_ASM_INT4_LOW_F32, "=r,=r,=r,=r,r", [byte], dtype=tl.float32,
                                            is_pure=True, pack=4)
            high = tl.inline_asm_elementwise(_ASM_INT4_HIGH_F32, "=r,=r,=r,=r,r", [byte], dtype=tl.float32,
                                             is_pure=True, pack=4)
        else:
            low, high = int4_values(byte, tl.float32, False)
        return low, high

    # int4 dot products in packed bf16x2 (the one-token GEMVs: layers/moe/moe_gemv.py, kernels/gemv.py). Per 32-bit
    # word of weight (8 nibbles k0..k7) one SHR and four ANDs put the nibble pairs (k0, k4), (k1, k5),
    # (k2, k6), (k3, k7) in the two 16-bit lanes as they are: bf16 n 2^-133 (bits 0-3, subnormal) or
    # n 2^-129 (bits 4-7: the top one is the exponent's lowest bit, and the value is still n 2^-129
    # across the subnormal / normal boundary); one HFMA2 each makes (n - 8) / 64 exactly (times 2^127
    # or 2^123, minus 1/8); four HFMA2 multiply them into x's matching pairs, which a separate pure block
    # makes by PRMTs of x's natural words and scales by 64 (exact), and which the compiler shares
    # between a tile's rows; two integer ops widen the two bf16 sums of four products to fp32. sm_90
    # SASS of the 21B gate/up program: about 2.5 instructions per value, 1 of them integer (half rate
    # on sm_90), against ~4 and ~1.4 with the fp32 conversion above, which left the kernels bound by
    # the ALU, not by their read.
    # The four products of each lane are summed in bf16, rounded after each (at most 2^-9 of a partial
    # sum each, so about 2^-8 of a sum of four, against int4's own error of several percent); the sums
    # of those go on in fp32.
    _ASM_X_PAIRS = tl.constexpr(
        "{\n    .reg .b32 a, b, c, d, p<4>, s64, z;\n    mov.b64 {a, b}, $2;\n    mov.b64 {c, d}, $3;\n"
        "    mov.b32 s64, 0x42804280;\n    mov.b32 z, 0x80008000;\n"  # 64, -0.0
        "    prmt.b32 p0, a, c, 0x5410;\n    prmt.b32 p1, a, c, 0x7632;\n"  # (x0, x4), (x1, x5)
        "    prmt.b32 p2, b, d, 0x5410;\n    prmt.b32 p3, b, d, 0x7632;\n"  # (x2, x6), (x3, x7)
        "    fma.rn.bf16x2 p0, p0, s64, z;\n    fma.rn.bf16x2 p1, p1, s64, z;\n"
        "    fma.rn.bf16x2 p2, p2, s64, z;\n    fma.rn.bf16x2 p3, p3, s64, z;\n"
        "    mov.b64 $0, {p0, p1};\n    mov.b64 $1, {p2, p3};\n}")
    _ASM_INT4_DOT_BF16X2 = tl.constexpr(
        "{\n    .reg .b32 t, a<4>, x<4>, p, lo_up, hi_up, off;\n"
        "    mov.b64 {x0, x1}, $3;\n    mov.b64 {x2, x3}, $4;\n"
        "    mov.b32 lo_up, 0x7F007F00;\n    mov.b32 hi_up, 0x7D007D00;\n"  # 2^127, 2^123
        "    mov.b32 off, 0xBE00BE00;\n    mov.b32 p, 0x80008000;\n"  # -1/8; -0.0 (an FMA, not HMUL2: sm_80)
        "    shr.u32 t, $2, 8;\n"
        "    and.b32 a0, $2, 0x000F000F;\n    and.b32 a1, $2, 0x00F000F0;\n"  # k0, k4; k1, k5
        "    and.b32 a2, t, 0x000F000F;\n    and.b32 a3, t, 0x00F000F0;\n"  # k2, k6; k3, k7
        "    fma.rn.bf16x2 a0, a0, lo_up, off;\n    fma.rn.bf16x2 a1, a1, hi_up, off;\n"
        "    fma.rn.bf16x2 a2, a2, lo_up, off;\n    fma.rn.bf16x2 a3, a3, hi_up, off;\n"
        "    fma.rn.bf16x2 p, a0, x0, p;\n    fma.rn.bf16x2 p, a1, x1, p;\n"
        "    fma.rn.bf16x2 p, a2, x2, p;\n    fma.rn.bf16x2 p, a3, x3, p;\n"
        "    shl.b32 $0, p, 16;\n    and.b32 $1, p, 0xFFFF0000;\n}")

    @triton.jit
    def int4_dot4(w, x, INLINE_ASM: tl.constexpr = False):
        """Per element, the dot product of 4 int4 weights and 4 bf16 activations, in fp32.

        w: uint16, 4 packed nibbles (q + 8, the low nibble first: k, k + 1, k + 2, k + 3); x: int64,
        the 4 bf16 activations of the same columns (their memory, read as one 64-bit word). Two
        neighbouring elements of a thread go to one asm block (pack 2: one 32-bit word of weight,
        two 64-bit words of x). Compiled (INLINE_ASM): the bf16x2 PTX above; the interpreter: the same
        products in fp32, per element.
        """
        if INLINE_ASM:
            pairs = tl.inline_asm_elementwise(_ASM_X_PAIRS, "=l,=l,l,l", [x], dtype=tl.int64, is_pure=True,
                                              pack=2)
            acc = tl.inline_asm_elementwise(_ASM_INT4_DOT_BF16X2, "=r,=r,r,l,l", [w, pairs], dtype=tl.float32,
                                            is_pure=True, pack=2)
        else:
            wi = w.to(tl.int32)
            acc = tl.zeros(w.shape, tl.float32)
            for i in tl.static_range(4):
                q = ((wi >> (4 * i)) & 0xF).to(tl.float32) - 8.0
                xi = (((x >> (16 * i)) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)
                acc += q * xi
        return acc

    @triton.jit
    def by2(C: tl.constexpr):
        """0..C-1 as runs of 2 (the compiler sees contiguity 2: 2-element vectors)."""
        j = tl.arange(0, C)
        return (j // 2) * 2 + j % 2

    @triton.jit
    def int4_pairs_load(w_rows, ok, START: tl.constexpr, NBYTES: tl.constexpr):
        """Bytes [START, START + NBYTES) of packed int4 rows (w_rows: [rows, 1] uint8 pointers; rows
        where ok) as uint16 [rows, NBYTES / 2], two to a 4-byte vector: `int4_packed_dot`'s weight."""
        return tl.load(w_rows.to(tl.pointer_type(tl.uint16)) + START // 2 + by2(NBYTES // 2)[None, :],
                       mask=ok[:, None])

    @triton.jit
    def int4_packed_dot(w, x_row, START: tl.constexpr, C: tl.constexpr, INLINE_ASM: tl.constexpr = False):
        """fp32 [rows]: `int4_pairs_load`'s tile w (columns [START, START + C)) times that range of
        the bf16 row x_row (scales not applied), by `int4_dot4`. x is loaded as a tile of w's shape and
        vector width (64-bit words of 4 bf16) through a pointer that is the same for every row, so both
        take one register layout and the loads of equal addresses in a thread are one load."""
        same = (tl.arange(0, w.shape[0]) * 0)[:, None]
        xq = tl.load(x_row.to(tl.pointer_type(tl.int64)) + START // 4 + same + by2(C // 4)[None, :])
        return tl.sum(int4_dot4(w, xq, INLINE_ASM), axis=1)

    @triton.jit
    def int8_values_f32(q, INLINE_ASM: tl.constexpr = False):
        """int8 -> float32 exactly (compiled: the PTX above, no I2F; the interpreter: a cast)."""
        if INLINE_ASM:
            return tl.inline_asm_elementwise(_ASM_INT8_F32, "=r,=r,=r,=r,r", [q], dtype=tl.float32,
                                             is_pure=True, pack=4)
        return q.to(tl.float32)

    # Counts that change from step to step are not specialised: Triton would otherwise compile
    # a variant for each of their classes (1, a multiple of 16, other) at first use, mid-serving.
    @triton.jit(do_not_specialize=["M"])
    def _weight_only_gemm_kernel(
        x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_wn, stride_sn, stride_om,
        INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, EVEN_K: tl.constexpr = False, INLINE_ASM: tl.constexpr = False,
        PDL: tl.constexpr = False,
    ):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # x is the previous kernel's; the split-K tile counters are put back to zero at the very end
        # of the previous split-K launch. The weights are static, but the loop's first loads come
        # from the software pipeline's prologue, which sits after this point.
        pdl_wait(PDL)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
        dot_ty = tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            # EVEN_K (K % BLOCK_K == 0): no mask along K, so the loads vectorise (a mask on k = 2j < K
            # varies byte by byte: one-byte loads). Weights take no `other`: a masked one only meets
            # a zero activation (k >= K) or feeds an output column that is not stored (n >= N), and
            # any stored byte is a finite value; a non-zero `other` costs a select per byte.
            kk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x_ok = m_ok[:, None]
            else:
                x_ok = m_ok[:, None] & (kk < K)[None, :]
            xt = tl.load(x_rows + kk[None, :], mask=x_ok, other=0.0).to(dot_ty)  # [BLOCK_M, BLOCK_K]
            if INT4:
                j = tl.arange(0, BLOCK_K // 2)
                if EVEN_K:
                    w_ok = n_ok[:, None]
                else:
                    w_ok = n_ok[:, None] & (k0 + 2 * j < K)[None, :]
                byte = tl.load(w_rows + (k0 // 2 + j)[None, :], mask=w_ok)  # [BLOCK_N, BLOCK_K / 2] uint8
                # x's even and odd columns, split in registers: the partners of the low and high nibbles
                x_even, x_odd = tl.split(tl.reshape(xt, [BLOCK_M, BLOCK_K // 2, 2]))
                w_low, w_high = int4_values(byte, dot_ty, INLINE_ASM)
                part = tl.dot(x_even, tl.trans(w_low), input_precision=PRECISION)
                part = tl.dot(x_odd, tl.trans(w_high), acc=part, input_precision=PRECISION)
            else:
                if EVEN_K:
                    w_ok = n_ok[:, None]
                else:
                    w_ok = n_ok[:, None] & (kk < K)[None, :]
                wq = tl.load(w_rows + kk[None, :], mask=w_ok)  # [BLOCK_N, BLOCK_K] int8
                part = tl.dot(xt, tl.trans(wq.to(dot_ty)), input_precision=PRECISION)
            if GROUP_SIZE > 0:
                scale = tl.load(s_ptr + rn * stride_sn + k0 // GROUP_SIZE, mask=n_ok, other=0.0)
                acc += part * scale[None, :]
            else:
                acc += part
        if GROUP_SIZE == 0:
            acc *= tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0)[None, :]
        # the output, or with split K a partial sum the tile's last program adds up (kernels/split_k.py)
        store_tile(acc, out_ptr, bias_ptr, ws_ptr, counter_ptr, rm, rn, M, N, stride_om, HAS_BIAS, SPLIT)

    @triton.jit(do_not_specialize=["num_r_blocks"])
    def _dequant_kernel(
        q_ptr, s_ptr, out_ptr, touched_ptr, R, K, num_r_blocks,
        stride_qe, stride_qr, stride_se, stride_sr, stride_oe, stride_or,
        BITS: tl.constexpr, SCALE_GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_TOUCHED: tl.constexpr = True, PDL: tl.constexpr = False,
    ):
        """out[e, r, k] = q[e, r, k] * scale in out's dtype for the matrices with touched[e] != 0 (a
        stack of experts; one dense weight is e = 0, HAS_TOUCHED off: every matrix). Grid: (row
        blocks x column blocks, matrices); each program one [BLOCK_R, BLOCK_K] tile."""
        e = tl.program_id(1)
        # `touched` is an earlier kernel's, and `out` (a scratch shared by the MoE layers) may still
        # be read by the previous GEMM: wait before both, on every program
        pdl_wait(PDL)
        if HAS_TOUCHED:
            if tl.load(touched_ptr + e) == 0:
                return
        pid = tl.program_id(0)
        rows = (pid % num_r_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < R
        k0 = (pid // num_r_blocks) * BLOCK_K
        e64 = e.to(tl.int64)
        q_rows = q_ptr + e64 * stride_qe + rows[:, None].to(tl.int64) * stride_qr  # [BLOCK_R, 1]
        s_rows = s_ptr + e64 * stride_se + rows[:, None].to(tl.int64) * stride_sr
        kk = k0 + tl.arange(0, BLOCK_K)
        if BITS == 4:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns: k = 2j (low nibble), 2j + 1 (high)
            byte = tl.load(q_rows + j[None, :], mask=r_ok[:, None] & (2 * j < K)[None, :], other=0x88)
            low, high = int4_values(byte, tl.float32)  # [BLOCK_R, BLOCK_K / 2] each
            if SCALE_GROUP > 0:  # a group is even, so 2j and 2j + 1 share it
                s = tl.load(s_rows + (2 * j // SCALE_GROUP)[None, :], mask=r_ok[:, None] & (2 * j < K)[None, :],
                            other=0.0)
            else:
                s = tl.load(s_rows, mask=r_ok[:, None], other=0.0)
            w = tl.reshape(tl.join(low * s, high * s), [BLOCK_R, BLOCK_K])  # interleaved back: k order
        else:
            q = tl.load(q_rows + kk[None, :], mask=r_ok[:, None] & (kk < K)[None, :], other=0)
            if SCALE_GROUP > 0:
                s = tl.load(s_rows + (kk // SCALE_GROUP)[None, :], mask=r_ok[:, None] & (kk < K)[None, :],
                            other=0.0)
            else:
                s = tl.load(s_rows, mask=r_ok[:, None], other=0.0)
            w = q.to(tl.float32) * s
        o_ptrs = out_ptr + e64 * stride_oe + rows[:, None].to(tl.int64) * stride_or + kk[None, :]
        tl.store(o_ptrs, w.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & (kk < K)[None, :])



def dequantize_into(out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                    touched: torch.Tensor | None = None) -> torch.Tensor:
    """One Triton pass: out [E, R, K] (or [R, K]) in its dtype = the weight-only matrices [E, R, K(/2)]
    times their scales [E, R, G]; with `touched` (int32 [>= E]) only the matrices whose entry is
    nonzero are written (the others' rows of out are left as they were)."""
    result = out
    if out.dim() == 2:
        out, qweight, scales = out.unsqueeze(0), qweight.unsqueeze(0), scales.unsqueeze(0)
    num, rows, k = out.shape
    block_r, block_k = 32, 512  # 16 KiB of bf16 written per program, 8 (int4) or 16 KiB read
    num_r_blocks = triton.cdiv(rows, block_r)
    _dequant_kernel[(num_r_blocks * triton.cdiv(k, block_k), num)](
        qweight, scales, out, touched if touched is not None else scales, rows, k, num_r_blocks,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        BITS=bits, SCALE_GROUP=group_size, BLOCK_R=block_r, BLOCK_K=block_k,
        HAS_TOUCHED=touched is not None,  # a dense weight: no per-call tensor to say "all of them"
        num_warps=4, num_stages=2, **pdl_launch(pdl_enabled(out.device)))
    return result


def _dot_settings(x: torch.Tensor) -> tuple[bool, str]:
    # The interpreter (CPU tensors) multiplies bf16 dot operands as raw bits: upcast there.
    # fp32 inputs get IEEE fp32 dots (fp32 is the oracle dtype); half types use tensor cores.
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return dot_fp32, "ieee" if x.dtype == torch.float32 or dot_fp32 else "tf32"


# Rows (tokens) from which a CUDA weight-only GEMM dequantizes the weight once (`dequantize_into`, one
# pass: read the int8 / int4 bytes, write bf16) and runs cuBLAS on it, instead of the Triton GEMM that
# converts every weight tile once per BLOCK_M rows. Measured on an H100 (2560 x 3072, bf16 cuBLAS
# 16.5 us at 512 tokens and 84 us at 4096): the Triton GEMM took 43.3 / 190 us (wint8) and 40.6 / 195
# (wint4) there, 2.3-2.6x bf16, where the dequantizing pass costs about the 24 MB it moves (~10 us).
DEQUANT_GEMM_MIN_TOKENS = 256


def weight_only_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                       group_size: int, bias: torch.Tensor | None = None,
                       tiles: GemmTiles | None = None) -> torch.Tensor:
    """x [..., K] (fp32 / fp16 / bf16) -> [..., N] in x's dtype, through the Triton kernel, or (CUDA,
    from DEQUANT_GEMM_MIN_TOKENS rows, no `tiles` forced) a dequantizing pass and cuBLAS."""
    assert HAS_TRITON, "triton is not installed"
    assert bits in (4, 8) and scales.dtype == torch.float32
    k = x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if tiles is None and x2.is_cuda and m >= DEQUANT_GEMM_MIN_TOKENS:
        w = dequantize_into(torch.empty(n, k, dtype=x.dtype, device=x.device), qweight, scales, bits, group_size)
        return torch.nn.functional.linear(x, w, bias)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    t = tiles or choose_tiles(m, n, k, group_size, x.device)
    if group_size:
        assert group_size % t.block_k == 0, f"BLOCK_K {t.block_k} must divide the group size {group_size}"
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    split = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), split)
    assert grid[0] * grid[1] <= split_k.MAX_TILES or split == 1
    # split K: fp32 partial sums, reduced by each tile's last program (kernels/split_k.py)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = split_k.tile_counters(x.device) if split > 1 else out
    dot_fp32, precision = _dot_settings(x2)
    _weight_only_gemm_kernel[grid](
        x2, qweight, scales, bias if bias is not None else x2, out, ws, counters,
        m, n, k, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), n,
        INT4=bits == 4, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
        PRECISION=precision, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT=split > 1,
        EVEN_K=k % t.block_k == 0, INLINE_ASM=x2.is_cuda,  # inline PTX: compiled code only
        num_warps=t.num_warps, num_stages=t.num_stages, **pdl_launch(pdl_enabled(x2.device)),
    )
    return out.view(*x.shape[:-1], n)


# ---- torch built-ins (GemmBackend.TORCH) --------------------------------------------------------

def int8pack_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch._weight_int8pack_mm: per-channel int8 only; scales [N, 1] fp32 (cast to x's dtype)."""
    k = x.shape[-1]
    y = torch._weight_int8pack_mm(x.reshape(-1, k), qweight, scales[:, 0].to(x.dtype))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


INT4PACK_GROUP = 128  # tinygemm groups; per-channel scales are repeated per group
INT4PACK_INNER_K_TILES = 8


def to_int4pack(qweight: torch.Tensor, scales: torch.Tensor, k: int, group_size: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Our int4 layout -> (tinygemm weight, scales_and_zeros [K/G, N, 2], G) for _weight_int4pack_mm.

    tinygemm dequantizes ``(nibble - 8) * scale + zero``: symmetric int4 is zero = 0 with our
    stored nibbles unchanged. The CUDA packer takes bytes with the even k in the high nibble (ours
    is in the low one); the CPU packer takes unpacked int32 nibbles. Needs a group size of 32..256
    dividing K, and on CUDA K % (16 * inner k tiles) == 0 and bf16.
    """
    g = group_size or INT4PACK_GROUP
    inner = INT4PACK_INNER_K_TILES if qweight.is_cuda else 1
    if g not in (32, 64, 128, 256) or k % g or k % (16 * inner):
        raise ValueError(f"torch's int4pack GEMM cannot take K={k} with group size {group_size or 'per channel'}")
    if qweight.is_cuda:
        swapped = ((qweight & 0xF) << 4) | (qweight >> 4)  # [N, K/2] uint8
        packed = torch._convert_weight_to_int4pack(swapped.contiguous(), inner)
    else:
        nibbles = unpack_int4(qweight, k).to(torch.int32) + INT4_OFFSET  # [N, K] in [1, 15]
        packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, inner)
    per_group = scales if group_size else scales.expand(-1, k // g)  # [N, K/G]
    sz = torch.stack([per_group.t(), torch.zeros_like(per_group.t())], dim=-1)  # [K/G, N, 2]
    return packed, sz.to(dtype).contiguous(), g


def int4pack_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
    y = mm(x.reshape(-1, k), packed, group, scales_and_zeros)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)
