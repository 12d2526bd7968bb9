"""GEMV for one-row decode steps whose weight read overlaps the kernel before it (sm_90+ with PDL).

``y = x @ W^T (+ bias)`` for x [M, K] and W [N, K] in bf16 / fp16 (`gemv`), or W weight-only int8 /
packed int4 with one scale per output channel (`gemv_quant`, the layout of kernels/quant_matmul.py).

At batch 1 the attention projections of a decode layer come right after small latency-bound
kernels (the output projection after decode attention, the qkv projection after RMSNorm), during
which HBM idles; cuBLAS then reads the weight only after they finish (21B-A3B on an H100: 8.0 us per
projection, 0.45 ms of a 3.2 ms step). With programmatic dependent launch (kernels/pdl.py) this
kernel's programs become resident while the previous kernel runs, so each loads its whole weight
slice into registers first, then waits (`pdl_wait`), then reads x. A Triton split-K GEMV that read
the weight after its launch had lost to cuBLAS at every shape (docs/performance.md, `142b7cc`);
reading it before the wait is the point of this one. Measured on an H100 (docs/performance.md):
21B-A3B batch-1 decode 3.222 -> 3.137 ms, 0.3B 0.820 -> 0.609 ms; as `gemv_quant`, 21B wint8
2.441 -> 2.364 ms and wint4 2.034 -> 1.945 ms. At 8 rows it lost (0.3B: 0.852 -> 1.095 ms), so
layers take it for one row only.

Kernel: program p owns rows [p * BLOCK_N, +BLOCK_N) of W whole: K is covered by up to three
power-of-two chunks (K1 + K2 + K3, e.g. 2560 = 2048 + 512), loaded unmasked along K, so no split-K
reduction and no workspace. After the wait, each of the M rows of x is multiplied in fp32 and
reduced over K, the bias added, and the row stored in x's dtype. Without PDL (eager on older GPUs,
the CPU interpreter) it is the same program with nothing to overlap.

qkv + rotary + KV store (`gemv_rope_store`, `gemv_quant_rope_store`; on unless
ERNIESERVE_FUSED_QKV_ROPE=0): the qkv projection's programs also apply ERNIE's interleaved rotary
to their q and k rows, store q, and write k and v straight into the token's paged-cache slot, so the
decode step loses `_rotary_store_kernel` (~2.8 us a layer on an H100 at batch 1, pure latency). A
program's BLOCK_N rows must lie in one head of q, k or v (`rope_layout`). At one row the position,
cos / sin and slot are read before the wait (`_rope_inputs`), the cache is written after it. Same
bits as `gemv` then `apply_rotary_and_store_kv_`. H100, 21B-A3B batch-1 decode: bf16 3.067 ->
3.021 ms, wint8 2.284 -> 2.245, wint4 1.838 -> 1.827.

int4 with bf16 x (ERNIESERVE_GEMV_PACKED, on by default): the weight slice is held as 16-bit pairs of
bytes and x read as 64-bit words of 4 columns in the same layout, multiplied in packed bf16x2 with
four products a lane summed in bf16 (quant_matmul.int4_dot4, shared with layers/moe/moe_gemv.py):
about half the instructions of the fp32 conversion, and 80-96 registers a thread instead of 128-168.

`gemv_supported` / `gemv_quant_supported` say which weights qualify; layers/linear.py and
layers/quantization/weight_only.py take these kernels for CUDA inputs of at most `gemv_max_tokens()`
rows (one) when PDL is on. The references are ``torch.nn.functional.linear`` and
`quant_matmul.weight_only_matmul_ref`.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from ernieserve.kernels.pdl import pdl_enabled, pdl_launch

try:
    import triton
    import triton.language as tl

    from ernieserve.kernels.pdl import pdl_wait
    from ernieserve.kernels.quant_matmul import (int4_packed_dot, int4_pairs_load, int4_values_f32,
                                                 int8_values_f32)

    HAS_TRITON = True
except ImportError:  # CPU-only installs use torch
    HAS_TRITON = False

# Rows up to which layers/linear.py takes this kernel (ERNIESERVE_DENSE_GEMV_MAX_TOKENS overrides;
# 0 turns it off). One: at 8 rows the 0.3B decode step took 1.095 ms against cuBLAS's 0.852 (H100).
MAX_TOKENS = 1
# Bytes of W a program holds in registers before the wait (4 warps: 160 B a thread at 20 KiB).
# 102 registers a thread for the one-row variant (sm_90 compile): 5 programs and 100 KiB of W per SM
# resident at once, so the 13 MB o_proj of 21B-A3B can load whole while decode attention runs.
SLICE_BYTES = 20 * 1024
# Largest weight taken: the programs of bigger ones cannot all be resident at once, so most of
# them would read after the wait anyway (the 21B dense MLP, the LM head stay on cuBLAS).
MAX_WEIGHT_BYTES = 32 * 2**20
NUM_WARPS = 4


@functools.cache  # asked on every CUDA linear call: read the environment once
def gemv_max_tokens() -> int:
    return int(os.environ.get("ERNIESERVE_DENSE_GEMV_MAX_TOKENS", MAX_TOKENS))


# Whether int4 weights with bf16 x multiply in packed bf16x2 (quant_matmul.int4_dot4, as the MoE
# experts' per-assignment GEMVs do) rather than converting to fp32; ERNIESERVE_GEMV_PACKED overrides.
# H100, 21B-A3B wint4 batch-1 decode (qkv, o_proj and the dense layer's MLP): 1.525 / 1.519 ->
# 1.501 / 1.487 ms, two rounds on one machine (docs/performance.md).
GEMV_PACKED = True


@functools.cache  # asked on every int4 GEMV launch: read the environment once
def gemv_packed_enabled() -> bool:
    value = os.environ.get("ERNIESERVE_GEMV_PACKED")
    return GEMV_PACKED if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _packed(x2: torch.Tensor, qweight: torch.Tensor, bits: int, k: int) -> bool:
    """Whether this int4 GEMV takes the packed products: bf16 x whose rows start 16-byte aligned
    (64-bit words of 4 columns), chunks of K of at least 8 columns (4-byte weight vectors)."""
    chunks = k_chunks(k)
    return (bits == 4 and x2.dtype == torch.bfloat16 and gemv_packed_enabled() and chunks is not None
            and min(c for c in chunks if c) >= 8 and x2.data_ptr() % 16 == 0 and (x2.stride(0) * 2) % 16 == 0
            and qweight.data_ptr() % 4 == 0)


@functools.cache  # asked by every attention layer's forward: read the environment once
def fused_qkv_rope_enabled() -> bool:
    """The qkv projection's GEMV also rotates q and k and stores k and v in the KV cache
    (`gemv_rope_store`): on unless ERNIESERVE_FUSED_QKV_ROPE is 0. H100, 21B-A3B batch-1 decode
    (docs/performance.md): bf16 3.067 -> 3.021 ms, wint8 2.284 -> 2.245, wint4 1.838 -> 1.827."""
    return os.environ.get("ERNIESERVE_FUSED_QKV_ROPE", "1").strip().lower() in ("1", "true", "yes", "on")


def k_chunks(k: int) -> tuple[int, int, int] | None:
    """K as K1 + K2 + K3, powers of two from the largest down (0 where absent), or None if K needs
    more than three (2560 -> (2048, 512, 0); 3072 -> (2048, 1024, 0); 1000 -> None)."""
    chunks = []
    rest = k
    while rest and len(chunks) < 3:
        c = 1 << (rest.bit_length() - 1)
        chunks.append(c)
        rest -= c
    if rest or k <= 0:
        return None
    return tuple(chunks + [0] * (3 - len(chunks)))  # type: ignore[return-value]


def block_n_for(n: int, k: int, elem_bytes: int) -> int:
    """Rows of W per program: the largest power of two whose slice fits SLICE_BYTES (at least 1)."""
    rows = max(1, SLICE_BYTES // (k * elem_bytes))
    bn = 1 << (rows.bit_length() - 1)
    return min(bn, triton.next_power_of_2(n))


def gemv_supported(weight: torch.Tensor) -> bool:
    """A contiguous [N, K] bf16 / fp16 weight of at most MAX_WEIGHT_BYTES whose K is a sum of at
    most three powers of two, each row slice at most SLICE_BYTES."""
    if weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float16) or not weight.is_contiguous():
        return False
    n, k = weight.shape
    return (k_chunks(k) is not None and k * weight.element_size() <= SLICE_BYTES
            and n * k * weight.element_size() <= MAX_WEIGHT_BYTES)


def gemv_quant_supported(qweight: torch.Tensor, scales: torch.Tensor, bits: int, k: int) -> bool:
    """Weight-only int8 [N, K] / packed int4 [N, K / 2] with one fp32 scale per output channel
    ([N, 1]), K (even for int4) a sum of at most three powers of two, at most MAX_WEIGHT_BYTES."""
    if bits not in (4, 8) or qweight.dim() != 2 or not qweight.is_contiguous():
        return False
    if scales.dtype != torch.float32 or scales.dim() != 2 or scales.shape[1] != 1:
        return False
    stored = k // 2 if bits == 4 else k
    chunks = k_chunks(k)
    return (chunks is not None and (bits == 8 or min(c for c in chunks if c) >= 2) and qweight.shape[1] == stored
            and stored <= SLICE_BYTES and qweight.numel() <= MAX_WEIGHT_BYTES)


def use_gemv_quant(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> bool:
    """Whether layers/quantization/weight_only.py should take `gemv_quant`: one row on CUDA with PDL
    on (the int GEMM's ~7 us floor at one token is mostly the weight read after launch)."""
    if not HAS_TRITON or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= min(1, gemv_max_tokens()) and pdl_enabled(x.device)
            and gemv_quant_supported(qweight, scales, bits, x.shape[-1]))


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether layers/linear.py should take `gemv` for this call: CUDA with PDL on (without it the
    weight is read after launch, where cuBLAS wins), at most gemv_max_tokens() rows, a supported
    weight in x's dtype."""
    if not HAS_TRITON or not x.is_cuda or x.dtype != weight.dtype:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= gemv_max_tokens() and pdl_enabled(x.device) and gemv_supported(weight)


if HAS_TRITON:

    @triton.jit
    def _weight_slice(w_rows, n_ok, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr):
        """A program's rows of W, [BLOCK_N, K] as chunks of K1, K2, K3 columns (w1, w2, w3; an absent
        chunk is w1 again, never read)."""
        w1 = tl.load(w_rows + tl.arange(0, K1)[None, :], mask=n_ok[:, None])
        w2 = w1
        w3 = w1
        if K2 > 0:
            w2 = tl.load(w_rows + K1 + tl.arange(0, K2)[None, :], mask=n_ok[:, None])
        if K3 > 0:
            w3 = tl.load(w_rows + K1 + K2 + tl.arange(0, K3)[None, :], mask=n_ok[:, None])
        return w1, w2, w3

    @triton.jit
    def _row_dot(w1, w2, w3, x_row, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr):
        """fp32 [BLOCK_N]: the slice's rows times one row of x, summed in fp32."""
        o1 = tl.arange(0, K1)
        acc = tl.sum(w1.to(tl.float32) * tl.load(x_row + o1).to(tl.float32)[None, :], axis=1)
        if K2 > 0:
            o2 = K1 + tl.arange(0, K2)
            acc += tl.sum(w2.to(tl.float32) * tl.load(x_row + o2).to(tl.float32)[None, :], axis=1)
        if K3 > 0:
            o3 = K1 + K2 + tl.arange(0, K3)
            acc += tl.sum(w3.to(tl.float32) * tl.load(x_row + o3).to(tl.float32)[None, :], axis=1)
        return acc

    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om,
        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, PDL: tl.constexpr = False,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        # the weight slice, whole, before the wait (static data: the previous kernel may still run)
        w1, w2, w3 = _weight_slice(w_ptr + rn.to(tl.int64)[:, None] * stride_wn, n_ok, K1, K2, K3)
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        pdl_wait(PDL)  # x is the previous kernel's; out may still be read by an earlier one
        # one row (the case served): straight-line code, so no conversion of W is hoisted out of a
        # loop and held in fp32 registers
        for m in range(0, 1 if ONE_ROW else M):
            acc = _row_dot(w1, w2, w3, x_ptr + m * stride_xm, K1, K2, K3)
            if HAS_BIAS:
                acc += b
            tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


    @triton.jit
    def _quant_chunk(w, x_row, START: tl.constexpr, C: tl.constexpr, INT4: tl.constexpr, INLINE_ASM: tl.constexpr,
                     PACKED: tl.constexpr = False):
        """fp32 [BLOCK_N]: W's rows times x over K columns [START, START + C), from the chunk's stored
        values `w` ([BLOCK_N, C] int8, or [BLOCK_N, C / 2] bytes of two int4 each: low nibble the
        even column; PACKED: [BLOCK_N, C / 4] uint16 of four). Integer values are exact in bf16; the
        scale is applied by the caller."""
        if PACKED:
            acc = int4_packed_dot(w, x_row, START, C, INLINE_ASM)
        else:  # (an if / else: Triton compiles the code after a constexpr branch's return too)
            xt = tl.load(x_row + START + tl.arange(0, C)).to(tl.float32)
            if INT4:
                x_even, x_odd = tl.split(tl.reshape(xt, [C // 2, 2]))
                # compiled: PTX straight to fp32, 4 bytes a register (quant_matmul.int4_values_f32)
                low, high = int4_values_f32(w, INLINE_ASM)
                acc = tl.sum(low * x_even[None, :] + high * x_odd[None, :], axis=1)  # one reduction
            else:
                acc = tl.sum(int8_values_f32(w, INLINE_ASM) * xt[None, :], axis=1)
        return acc

    @triton.jit
    def _quant_weight_slice(w_rows, n_ok, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, INT4: tl.constexpr,
                            PACKED: tl.constexpr = False):
        """_weight_slice of the stored values: int8 [BLOCK_N, K], or int4 bytes [BLOCK_N, K / 2]
        (every chunk at least two columns: `gemv_quant_supported`); PACKED: int4 as uint16 pairs
        of bytes (chunks of at least 8 columns)."""
        if PACKED:  # byte offsets: half the columns
            w1 = int4_pairs_load(w_rows, n_ok, 0, K1 // 2)
            w2 = w1
            w3 = w1
            if K2 > 0:
                w2 = int4_pairs_load(w_rows, n_ok, K1 // 2, K2 // 2)
            if K3 > 0:
                w3 = int4_pairs_load(w_rows, n_ok, (K1 + K2) // 2, K3 // 2)
        elif INT4:
            w1, w2, w3 = _weight_slice(w_rows, n_ok, K1 // 2, K2 // 2, K3 // 2)
        else:
            w1, w2, w3 = _weight_slice(w_rows, n_ok, K1, K2, K3)
        return w1, w2, w3

    @triton.jit
    def _quant_row_dot(w1, w2, w3, x_row, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                       INT4: tl.constexpr, INLINE_ASM: tl.constexpr, PACKED: tl.constexpr = False):
        """fp32 [BLOCK_N]: the stored slice's integer values times one row of x (scale not applied)."""
        acc = _quant_chunk(w1, x_row, 0, K1, INT4, INLINE_ASM, PACKED)
        if K2 > 0:
            acc += _quant_chunk(w2, x_row, K1, K2, INT4, INLINE_ASM, PACKED)
        if K3 > 0:
            acc += _quant_chunk(w3, x_row, K1 + K2, K3, INT4, INLINE_ASM, PACKED)
        return acc

    @triton.jit(do_not_specialize=["M"])
    def _gemv_quant_kernel(
        x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_om,
        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr, INT4: tl.constexpr,
        HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, INLINE_ASM: tl.constexpr = False,
        PDL: tl.constexpr = False, PACKED: tl.constexpr = False,
    ):
        """_gemv_kernel for weight-only int8 / int4 with a scale per output channel (PACKED: int4
        times bf16 x in packed bf16x2, quant_matmul.int4_dot4)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        # the stored weight slice, its scales and bias before the wait
        w1, w2, w3 = _quant_weight_slice(w_ptr + rn.to(tl.int64)[:, None] * stride_wn, n_ok, K1, K2, K3, INT4,
                                         PACKED)
        scale = tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        pdl_wait(PDL)  # x is the previous kernel's; out may still be read by an earlier one
        for m in range(0, 1 if ONE_ROW else M):
            acc = _quant_row_dot(w1, w2, w3, x_ptr + m * stride_xm, K1, K2, K3, INT4, INLINE_ASM,
                                 PACKED)
            acc = acc * scale
            if HAS_BIAS:
                acc += b
            tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


    # ---- qkv projection + rotary + KV store (ERNIESERVE_FUSED_QKV_ROPE): see gemv_rope_store

    @triton.jit
    def _rotate_pairs(x1, x2, c, s, INLINE_ASM: tl.constexpr):
        """(x1 c - x2 s, x2 c + x1 s) in fp32, every product and sum rounded on its own, as in
        `_rotary_store_kernel` (compiled without FMA contraction; these kernels keep it for their sums,
        so the rotation is written as explicitly rounded PTX, which is never contracted nor flushed to
        zero; libdevice's mul_rn would be ftz here)."""
        if INLINE_ASM:
            r1 = tl.inline_asm_elementwise(
                "{ .reg .f32 p, q; mul.rn.f32 p, $1, $2; mul.rn.f32 q, $3, $4; sub.rn.f32 $0, p, q; }",
                "=r,r,r,r,r", [x1, c, x2, s], dtype=tl.float32, is_pure=True, pack=1)
            r2 = tl.inline_asm_elementwise(
                "{ .reg .f32 p, q; mul.rn.f32 p, $1, $2; mul.rn.f32 q, $3, $4; add.rn.f32 $0, p, q; }",
                "=r,r,r,r,r", [x2, c, x1, s], dtype=tl.float32, is_pure=True, pack=1)
        else:  # the interpreter (no inline asm): numpy rounds each operation anyway
            r1 = x1 * c - x2 * s
            r2 = x2 * c + x1 * s
        return r1, r2

    @triton.jit
    def _rope_inputs(m, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_table,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Token m's cos and sin [BLOCK_N / 2] for this program's pairs, and its cache slot.

        The one-row kernels read them before the PDL wait: positions and slots are the step's
        uploaded inputs, copied before the step's first kernel, so at least two launches before any
        qkv projection (embedding, then the norm), which have completed when this kernel's programs
        run (kernels/pdl.py: a kernel lets the next one launch only after its own wait); the tables
        are static."""
        pos = tl.load(pos_ptr + m).to(tl.int64)
        # interleaved pairs (2j, 2j + 1) of one head: the program's first row is even
        j = (tl.program_id(0) * BLOCK_N % HEAD_DIM) // 2 + tl.arange(0, BLOCK_N // 2)
        c = tl.load(cos_ptr + pos * stride_table + j)
        s = tl.load(sin_ptr + pos * stride_table + j)
        slot = tl.load(slot_ptr + m)
        return c, s, slot

    @triton.jit
    def _rope_kv_epilogue(
        acc, rn, m, out_ptr, stride_om, c, s, slot,
        k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
        BLOCK_N: tl.constexpr, Q_SIZE: tl.constexpr, KV_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        CACHE_BLOCK: tl.constexpr, INLINE_ASM: tl.constexpr,
    ):
        """Token m's qkv rows rn (fp32 sums; the program's rows lie in one head of q, k or v): q rows
        rotated into out, k rows rotated and v rows as they are into the token's cache slot (slot
        -1: nothing), with its cos / sin / slot from `_rope_inputs`. The same roundings as the GEMV's
        store then `_rotary_store_kernel`."""
        val = acc.to(out_ptr.dtype.element_ty)  # what the plain GEMV stores
        x1, x2 = tl.split(tl.reshape(val.to(tl.float32), [BLOCK_N // 2, 2]))
        r1, r2 = _rotate_pairs(x1, x2, c, s, INLINE_ASM)
        rotated = tl.reshape(tl.join(r1, r2), [BLOCK_N]).to(out_ptr.dtype.element_ty)
        y = tl.where(rn < Q_SIZE + KV_SIZE, rotated, val)  # q and k rotated, v not
        tl.store(out_ptr + m * stride_om + rn, y, mask=rn < Q_SIZE)
        if slot >= 0:
            is_k = (rn >= Q_SIZE) & (rn < Q_SIZE + KV_SIZE)
            is_v = rn >= Q_SIZE + KV_SIZE
            kv = rn - tl.where(is_v, Q_SIZE + KV_SIZE, Q_SIZE)  # row within the k (or v) heads
            dst = (slot // CACHE_BLOCK) * stride_cb + (slot % CACHE_BLOCK) * stride_cs \
                + (kv // HEAD_DIM) * stride_ch + kv % HEAD_DIM
            tl.store(k_cache_ptr + dst, y.to(k_cache_ptr.dtype.element_ty), mask=is_k)
            tl.store(v_cache_ptr + dst, y.to(v_cache_ptr.dtype.element_ty), mask=is_v)

    @triton.jit(do_not_specialize=["M"])
    def _gemv_rope_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        M, stride_xm, stride_wn, stride_om, stride_table, stride_cb, stride_cs, stride_ch,
        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr,
        Q_SIZE: tl.constexpr, KV_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, INLINE_ASM: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """_gemv_kernel of a qkv weight whose epilogue rotates q and k and stores k and v in the cache."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < Q_SIZE + 2 * KV_SIZE
        w1, w2, w3 = _weight_slice(w_ptr + rn.to(tl.int64)[:, None] * stride_wn, n_ok, K1, K2, K3)
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if ONE_ROW:  # the row's position, cos / sin and slot before the wait (see _rope_inputs)
            c, s, slot = _rope_inputs(0, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_table, BLOCK_N, HEAD_DIM)
        # x and the KV cache are earlier kernels'
        pdl_wait(PDL)
        for m in range(0, 1 if ONE_ROW else M):
            acc = _row_dot(w1, w2, w3, x_ptr + m * stride_xm, K1, K2, K3)
            if HAS_BIAS:
                acc += b
            if not ONE_ROW:
                c, s, slot = _rope_inputs(m, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_table, BLOCK_N, HEAD_DIM)
            _rope_kv_epilogue(acc, rn, m, out_ptr, stride_om, c, s, slot,
                              k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
                              BLOCK_N, Q_SIZE, KV_SIZE, HEAD_DIM, CACHE_BLOCK, INLINE_ASM)

    @triton.jit(do_not_specialize=["M"])
    def _gemv_quant_rope_kernel(
        x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        M, stride_xm, stride_wn, stride_sn, stride_om, stride_table, stride_cb, stride_cs, stride_ch,
        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr, INT4: tl.constexpr,
        Q_SIZE: tl.constexpr, KV_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, INLINE_ASM: tl.constexpr, PDL: tl.constexpr = False,
        PACKED: tl.constexpr = False,
    ):
        """_gemv_quant_kernel with _gemv_rope_kernel's epilogue."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < Q_SIZE + 2 * KV_SIZE
        w1, w2, w3 = _quant_weight_slice(w_ptr + rn.to(tl.int64)[:, None] * stride_wn, n_ok, K1, K2, K3, INT4,
                                         PACKED)
        scale = tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if ONE_ROW:  # see _gemv_rope_kernel
            c, s, slot = _rope_inputs(0, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_table, BLOCK_N, HEAD_DIM)
        pdl_wait(PDL)
        for m in range(0, 1 if ONE_ROW else M):
            acc = _quant_row_dot(w1, w2, w3, x_ptr + m * stride_xm, K1, K2, K3, INT4, INLINE_ASM,
                                 PACKED)
            acc = acc * scale
            if HAS_BIAS:
                acc += b
            if not ONE_ROW:
                c, s, slot = _rope_inputs(m, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_table, BLOCK_N, HEAD_DIM)
            _rope_kv_epilogue(acc, rn, m, out_ptr, stride_om, c, s, slot,
                              k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
                              BLOCK_N, Q_SIZE, KV_SIZE, HEAD_DIM, CACHE_BLOCK, INLINE_ASM)


def _rows_and_output(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as [M, K] rows with unit column stride, and an empty [M, n] output in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)


def gemv_quant(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: weight_only_matmul (kernels/quant_matmul.py) with one
    scale per output channel, for a few rows of x."""
    assert HAS_TRITON, "triton is not installed"
    k = x.shape[-1]
    assert gemv_quant_supported(qweight, scales, bits, k), "see gemv_quant_supported"
    n = qweight.shape[0]
    x2, out = _rows_and_output(x, n)
    m = x2.shape[0]
    if m == 0:
        return out.view(*x.shape[:-1], n)
    k1, k2, k3 = k_chunks(k)  # type: ignore[misc]
    bn = block_n_for(n, qweight.shape[1], 1)
    _gemv_quant_kernel[(triton.cdiv(n, bn),)](
        x2, qweight, scales, bias if bias is not None else x2, out, m, n, x2.stride(0), qweight.stride(0),
        scales.stride(0), out.stride(0), K1=k1, K2=k2, K3=k3, BLOCK_N=bn, INT4=bits == 4, HAS_BIAS=bias is not None,
        ONE_ROW=m == 1, INLINE_ASM=x2.is_cuda, PACKED=_packed(x2, qweight, bits, k), num_warps=NUM_WARPS,
        **pdl_launch(pdl_enabled(x.device)))
    return out.view(*x.shape[:-1], n)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: F.linear(x, weight, bias) for a few rows of x."""
    assert HAS_TRITON, "triton is not installed"
    assert gemv_supported(weight), "weight must be a contiguous [N, K] bf16/fp16 tensor (see gemv_supported)"
    n, k = weight.shape
    assert x.shape[-1] == k, f"x has {x.shape[-1]} features, the weight {k}"
    x2, out = _rows_and_output(x, n)
    m = x2.shape[0]
    if m == 0:
        return out.view(*x.shape[:-1], n)
    k1, k2, k3 = k_chunks(k)  # type: ignore[misc]
    bn = block_n_for(n, k, weight.element_size())
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x2, weight, bias if bias is not None else weight, out, m, n, x2.stride(0), weight.stride(0), out.stride(0),
        K1=k1, K2=k2, K3=k3, BLOCK_N=bn, HAS_BIAS=bias is not None, ONE_ROW=m == 1, num_warps=NUM_WARPS,
        **pdl_launch(pdl_enabled(x.device)))
    return out.view(*x.shape[:-1], n)


def rope_layout(n: int, block_n: int, num_kv_heads: int, head_dim: int) -> tuple[int, int] | None:
    """(q_size, kv_size) of a qkv weight of n rows ([q heads, k heads, v heads] x head_dim) whose
    programs of block_n rows each lie within one head and hold whole interleaved pairs, or None."""
    kv_size = num_kv_heads * head_dim
    q_size = n - 2 * kv_size
    if kv_size <= 0 or q_size <= 0 or q_size % head_dim or block_n % 2 or head_dim % block_n:
        return None
    return q_size, kv_size


class _RopeLaunch(NamedTuple):
    out: torch.Tensor  # q [M, q_size]
    tensors: tuple  # positions, slots, cos, sin, k_cache, v_cache
    strides: tuple  # the table's row stride, the cache's block / slot / head strides
    consts: dict  # BLOCK_N, Q_SIZE, ... INLINE_ASM


def _rope_launch(x2: torch.Tensor, n: int, block_n: int, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> _RopeLaunch | None:
    """The epilogue's output and arguments for rows x2 [M, K] of a qkv weight of n rows, or None where
    its layout does not fit (`rope_layout`)."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    layout = rope_layout(n, block_n, num_kv_heads, head_dim)
    if layout is None:
        return None
    q_size, kv_size = layout
    m = x2.shape[0]
    assert k_cache.stride(-1) == 1, "cache rows [num_blocks, block_size, kv_heads, head_dim] with unit stride"
    assert cos.shape[-1] == head_dim // 2 and cos.stride() == sin.stride() and cos.stride(-1) == 1
    assert positions.shape == (m,) and slot_mapping.dim() == 1 and slot_mapping.shape[0] >= m
    assert slot_mapping.stride(0) == 1
    return _RopeLaunch(
        torch.empty(m, q_size, dtype=x2.dtype, device=x2.device),
        (positions.contiguous(), slot_mapping, cos, sin, k_cache, v_cache),
        (cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        dict(BLOCK_N=block_n, Q_SIZE=q_size, KV_SIZE=kv_size, HEAD_DIM=head_dim, CACHE_BLOCK=block_size,
             ONE_ROW=m == 1, INLINE_ASM=x2.is_cuda))


def gemv_rope_store(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor | None:
    """The qkv projection of x [..., K] (`gemv`) whose epilogue also does `apply_rotary_and_store_kv_`
    (kernels/rotary.py) with interleaved pairs: returns q [..., q_size] rotated; k rotated and v go
    straight into their slots of k_cache / v_cache ([num_blocks, block_size, kv_heads, head_dim],
    slot -1: not stored) and nowhere else. cos / sin: [rows, head_dim / 2] fp32 tables, token t
    reading row positions[t]. The weight's rows are q heads, k heads, v heads (QKVParallelLinear).
    None, with nothing launched, where a program's rows would straddle a head (`rope_layout`).

    The same bits as `gemv` then `apply_rotary_and_store_kv_`: the rows are the same sums (the same
    code, compiled with FMA contraction as `gemv`), rounded to x's dtype, rotated in fp32 with each
    product and difference rounded on its own (the rotary kernel is compiled without contraction;
    here the rotation uses explicitly rounded operations instead), rounded to x's dtype again, and
    k then to the cache's."""
    assert HAS_TRITON, "triton is not installed"
    assert gemv_supported(weight), "weight must be a contiguous [N, K] bf16/fp16 tensor (see gemv_supported)"
    n, k = weight.shape
    assert x.shape[-1] == k, f"x has {x.shape[-1]} features, the weight {k}"
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r = _rope_launch(x2, n, block_n_for(n, k, weight.element_size()), positions, cos, sin, k_cache, v_cache,
                     slot_mapping)
    if r is None:
        return None
    if x2.shape[0]:
        k1, k2, k3 = k_chunks(k)  # type: ignore[misc]
        _gemv_rope_kernel[(n // r.consts["BLOCK_N"],)](
            x2, weight, bias if bias is not None else weight, r.out, *r.tensors, x2.shape[0], x2.stride(0),
            weight.stride(0), r.out.stride(0), *r.strides, K1=k1, K2=k2, K3=k3, HAS_BIAS=bias is not None,
            num_warps=NUM_WARPS, **r.consts, **pdl_launch(pdl_enabled(x.device)))
    return r.out.view(*x.shape[:-1], r.out.shape[-1])


def gemv_quant_rope_store(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                          bias: torch.Tensor | None, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> torch.Tensor | None:
    """`gemv_rope_store` for a weight-only int8 / int4 qkv weight (`gemv_quant`'s layout)."""
    assert HAS_TRITON, "triton is not installed"
    k = x.shape[-1]
    assert gemv_quant_supported(qweight, scales, bits, k), "see gemv_quant_supported"
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r = _rope_launch(x2, n, block_n_for(n, qweight.shape[1], 1), positions, cos, sin, k_cache, v_cache,
                     slot_mapping)
    if r is None:
        return None
    if x2.shape[0]:
        k1, k2, k3 = k_chunks(k)  # type: ignore[misc]
        _gemv_quant_rope_kernel[(n // r.consts["BLOCK_N"],)](
            x2, qweight, scales, bias if bias is not None else x2, r.out, *r.tensors, x2.shape[0], x2.stride(0),
            qweight.stride(0), scales.stride(0), r.out.stride(0), *r.strides, K1=k1, K2=k2, K3=k3, INT4=bits == 4,
            HAS_BIAS=bias is not None, PACKED=_packed(x2, qweight, bits, k), num_warps=NUM_WARPS, **r.consts,
            **pdl_launch(pdl_enabled(x.device)))
    return r.out.view(*x.shape[:-1], r.out.shape[-1])
