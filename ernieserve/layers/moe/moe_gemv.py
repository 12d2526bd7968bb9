"""GEMV-style decode kernels for weight-only quantized routed experts (wint4, wint8).

At decode an expert sees a few assignments (1 token, top-6: one row each; 64 tokens: ~6), so its
work is a weight stream, not a matmul. The fused path (`fused_moe_quant.py`) still feeds tensor
cores: it pads each expert's rows to BLOCK_M >= 16 and sends every dequantized weight tile through
shared memory to `tl.dot`, which at 1-8 tokens runs wint4 4-7x slower than reading its bytes.

Here there is no dot. Each program owns one (expert block of BLOCK_M assignments, BLOCK_N output
channels) tile and walks K: it loads the stored weight tile ``[BLOCK_N, BLOCK_K]`` (int4: the
packed bytes ``[BLOCK_N, BLOCK_K / 2]``) straight from global memory, each row's bytes contiguous
(coalesced along K), turns it into fp32 values in registers by bit tricks (`_int4_values`,
`_int8_values`: no int -> float converts), and for the block's gathered activation rows
``a [BLOCK_M, BLOCK_K]`` (fp32) computes ``sum_k w[None, n, k] * a[m, None, k]`` into fp32
accumulators ``[BLOCK_M, BLOCK_N]``: each weight register is reused by all BLOCK_M rows, which is
why BLOCK_M is 1..8, sized to the expected rows per touched expert (`choose_gemv_tiles`).

Scales as the fused path: per output channel once in the epilogue; group-wise per K step on the
partial sums (BLOCK_K divides the group). Gate/up: two tiles against the same activation rows,
silu(gate) * up in the epilogue, stored per assignment ``[N, I]``. Down: the routing weight in the
epilogue, optional split K into ``[splits, N, H]`` fp32 partials summed with the top-k combine in a
fixed order (no atomics). The same align kernel and sorted ids as the fused path (at BLOCK_M), so
no host sync and no routing-dependent allocation: capturable in CUDA graphs.

`fused_moe_quant_triton(..., path=QuantMoEPath.GEMV)` runs it; `GEMV_MAX_TOKENS` (fused_moe_quant.py)
is the token count up to which AUTO picks it: never since the fused kernels' inline-PTX int4
conversion (measured on an H100; the numbers are beside it).

The per-assignment GEMVs (second half of this file, `assignment_path`, `QuantMoEPath.ASSIGN`) are
what AUTO takes at one token: no alignment at all, one warp per tile of one assignment's expert,
the weight tile whole in registers, and the down GEMV's tile read before the PDL wait.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ernieserve.kernels.pdl import pdl_enabled, pdl_launch
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.layers.moe.fused_moe import HAS_TRITON, GemmTile
from ernieserve.layers.moe.fused_moe_quant import (
    _KIND,
    ExpertScheme,
    QuantizedExperts,
    QuantMoETiles,
    _num_sms,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ernieserve.layers.moe.fused_moe import _block_coords
    from ernieserve.layers.moe.fused_moe_quant import _int4_values, _load_a

GEMV_MAX_BLOCK_M = 8  # rows per expert block; more rows per expert are a job for the fused (dot) path


def _next_pow2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, v))))


def expected_rows_per_expert(num_tokens: int, top_k: int, num_experts: int) -> float:
    """Mean assignments per touched expert under uniform routing: a token's top_k distinct experts
    miss a given expert with probability 1 - top_k / E, so E (1 - (1 - top_k / E)^T) are touched.
    (T 1: 1 row; T 8 at E 64, top-6: ~1.4; T 64: ~6.)"""
    n = num_tokens * top_k
    if n == 0:
        return 0.0
    miss = max(0.0, 1.0 - top_k / num_experts)
    touched = num_experts * (1.0 - miss**num_tokens)
    return n / max(1.0, min(touched, float(n)))


def choose_gemv_tiles(num_tokens: int, top_k: int, experts: QuantizedExperts,
                      device: torch.device) -> QuantMoETiles:
    """BLOCK_M: the next power of two of the expected rows per touched expert (1 at one token, 2 at
    8, 8 at 64 for the 21B-A3B shape), capped at `GEMV_MAX_BLOCK_M`; an expert with more rows takes
    several blocks (its weight tiles then come again, from L2 when the blocks run together).

    Weight tiles: 256 bytes of each weight row per K step (int4 BLOCK_K 512, int8 256: two cache
    lines, one 16-byte load per thread at BLOCK_N 16 x 4 warps for int4), halved for each doubling
    of BLOCK_M past 2 so the products per thread per step (BLOCK_M x BLOCK_N x BLOCK_K / 128) stay
    <= 128 fp32 registers; capped by the scale group. BLOCK_N 16 for gate/up (two tiles per step;
    one token's 6 experts give 6 x 96 = 576 programs: several per SM, enough loads in flight) and
    32 for down (6 x 80 = 480). The down GEMM splits K only when its N tiles cannot fill the GPU.

    TODO(lead, GPU): reasoned, not measured; `benchmarks/bench_moe_quant.py --path gemv --sweep`.
    """
    if experts.scheme not in (ExpertScheme.WINT4, ExpertScheme.WINT8):
        raise ValueError(f"the gemv path takes weight-only schemes (wint8, wint4), not {experts.scheme.value}")
    num_experts = experts.num_experts
    rows = expected_rows_per_expert(num_tokens, top_k, num_experts)
    block_m = min(GEMV_MAX_BLOCK_M, _next_pow2(math.ceil(rows)))
    block_k = 512 if experts.scheme is ExpertScheme.WINT4 else 256
    block_k = max(32, block_k // max(1, block_m // 2))
    if experts.group_size:
        block_k = min(block_k, experts.group_size)
    gate_up, down = GemmTile(16, block_k, 4, 2), GemmTile(32, block_k, 4, 2)
    split = 1
    if device.type == "cuda":
        touched = min(num_experts, num_tokens * top_k)
        programs = max(1, touched * -(-experts.hidden // down.block_n))
        split = max(1, min(4, 4 * _num_sms(device.index or 0) // programs, -(-experts.inter // down.block_k)))
    return QuantMoETiles(block_m, gate_up, down, split, group_m=8)


if HAS_TRITON:

    @triton.jit
    def _int8_values(q):
        """int8 -> fp32 exactly without an int -> float convert: q + 128 in [0, 255] sits in the low
        mantissa bits of 2^23, so the bits read as 2^23 + 128 + q; subtracting 2^23 + 128 leaves q."""
        return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _gemv_step(a0, a1, w_rows, k0, K, n_ok, KIND: tl.constexpr, BLOCK_K: tl.constexpr):
        """sum over one K step of a[m, k] * q[n, k]: [BLOCK_M, BLOCK_N] fp32 (scales: the caller).

        a0, a1: the activation rows in fp32, [BLOCK_M, BLOCK_K] (int8; a1 unused) or their even and
        odd columns [BLOCK_M, BLOCK_K / 2] (int4). w_rows: [BLOCK_N, 1] pointers to each weight
        row's first stored byte; the tile is loaded row-major, contiguous along K.
        """
        if KIND == 4:
            j = tl.arange(0, BLOCK_K // 2)
            byte = tl.load(w_rows + (k0 // 2 + j)[None, :], mask=n_ok[:, None] & (k0 + 2 * j < K)[None, :],
                           other=0x88)  # [BLOCK_N, BLOCK_K / 2]; 0x88 is q = 0 in both nibbles
            low, high = _int4_values(byte, tl.float32)  # even k, odd k
            prod = low[None, :, :] * a0[:, None, :] + high[None, :, :] * a1[:, None, :]
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0)  # [BLOCK_N, BLOCK_K]
            prod = _int8_values(q)[None, :, :] * a0[:, None, :]
        return tl.sum(prod, axis=2)  # [BLOCK_M, BLOCK_N, BLOCK_K(/2)] -> [BLOCK_M, BLOCK_N]

    # Counts that change from step to step are not specialised: Triton would otherwise compile
    # a variant for each of their classes (1, a multiple of 16, other) at first use, mid-serving.
    @triton.jit(do_not_specialize=["N", "num_pid_m"])
    def _gate_up_gemv_kernel(
        a_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, total_ptr,
        N, H, I, num_pid_m, up_scale_row,
        stride_at, stride_we, stride_wn, stride_wse, stride_wsn,
        TOP_K: tl.constexpr, KIND: tl.constexpr, SCALE_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] assignments
        row_ok = ids < N
        tokens = (ids // TOP_K).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        a_rows = a_ptr + tokens[:, None] * stride_at  # [BLOCK_M, 1] rows of x
        g_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
        u_rows = g_rows + I * stride_wn  # up rows follow the gate rows
        s_base = ws_ptr + expert * stride_wse
        sg_ptrs = s_base + offs_n * stride_wsn  # [BLOCK_N]
        su_ptrs = s_base + (up_scale_row + offs_n) * stride_wsn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a0, a1 = _load_a(a_rows, k0, H, row_ok, KIND == 4, BLOCK_M, BLOCK_K)
            a0, a1 = a0.to(tl.float32), a1.to(tl.float32)
            part_g = _gemv_step(a0, a1, g_rows, k0, H, n_ok, KIND, BLOCK_K)
            part_u = _gemv_step(a0, a1, u_rows, k0, H, n_ok, KIND, BLOCK_K)
            if SCALE_GROUP > 0:  # this step's K group
                kg = k0 // SCALE_GROUP
                part_g *= tl.load(sg_ptrs + kg, mask=n_ok, other=0.0)[None, :]
                part_u *= tl.load(su_ptrs + kg, mask=n_ok, other=0.0)[None, :]
            acc_g += part_g
            acc_u += part_u
        if SCALE_GROUP == 0:  # one scale per output channel
            acc_g *= tl.load(sg_ptrs, mask=n_ok, other=0.0)[None, :]
            acc_u *= tl.load(su_ptrs, mask=n_ok, other=0.0)[None, :]
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, float32
        out_ptrs = out_ptr + ids[:, None].to(tl.int64) * I + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["N", "num_pid_m"])
    def _down_gemv_kernel(
        a_ptr, w_ptr, ws_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
        N, H, I, num_pid_m, k_per_split,
        stride_am, stride_we, stride_wn, stride_wse, stride_wsn, stride_os,
        KIND: tl.constexpr, SCALE_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
        pid_k = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = ids < N
        rows = ids.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        a_rows = a_ptr + rows[:, None] * stride_am  # [BLOCK_M, 1] rows of inter [N, I], assignment order
        w_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
        s_ptrs = ws_ptr + expert * stride_wse + offs_n * stride_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, I)
        for k0 in range(k_begin, k_end, BLOCK_K):
            a0, a1 = _load_a(a_rows, k0, I, row_ok, KIND == 4, BLOCK_M, BLOCK_K)
            part = _gemv_step(a0.to(tl.float32), a1.to(tl.float32), w_rows, k0, I, n_ok, KIND, BLOCK_K)
            if SCALE_GROUP > 0:
                part *= tl.load(s_ptrs + k0 // SCALE_GROUP, mask=n_ok, other=0.0)[None, :]
            acc += part
        if SCALE_GROUP == 0:
            acc *= tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        acc *= tl.load(weights_ptr + rows, mask=row_ok, other=0.0)[:, None]  # routing weight
        out_ptrs = out_ptr + pid_k * stride_os + rows[:, None] * H + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def gemv_path(
    x: torch.Tensor,  # [T, H]
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    tiles: QuantMoETiles | None,
    foreign_experts: bool,
    sum_slots: bool = True,
) -> torch.Tensor:  # [T, H]
    """The align kernel at BLOCK_M, the gate/up GEMV, the down GEMV, the fixed-order combine."""
    if experts.scheme not in (ExpertScheme.WINT4, ExpertScheme.WINT8):
        raise ValueError(f"the gemv path takes weight-only schemes (wint8, wint4), not {experts.scheme.value}")
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = experts.num_experts, experts.inter, topk_ids.shape[1]
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    assert hidden == experts.hidden, f"x has {hidden} features, the experts {experts.hidden}"
    x = x.contiguous()
    t = tiles or choose_gemv_tiles(num_tokens, top_k, experts, x.device)
    group = experts.group_size
    for name, tile in (("gate_up", t.gate_up), ("down", t.down)):
        if tile.block_k < 2 or tile.block_k & (tile.block_k - 1):
            raise ValueError(f"tiles.{name}.block_k ({tile.block_k}) must be a power of two >= 2")
        if group and group % tile.block_k:  # a K step never straddles two scale groups
            raise ValueError(f"tiles.{name}.block_k ({tile.block_k}) must divide the scale group ({group})")
    sorted_ids, block_expert, total = fm.moe_align(topk_ids.contiguous(), num_experts, t.block_m)
    num_pid_m = block_expert.shape[0]
    kind = _KIND[experts.scheme]

    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, I], assignment order
    w13, s13 = experts.w13, experts.w13_scale
    g = t.gate_up
    _gate_up_gemv_kernel[(num_pid_m * triton.cdiv(inter, g.block_n),)](
        x, w13, s13, act, sorted_ids, block_expert, total,
        n, hidden, inter, num_pid_m, experts.up_scale_row,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        TOP_K=top_k, KIND=kind, SCALE_GROUP=group, BLOCK_M=t.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
        GROUP_M=t.group_m, num_warps=g.num_warps, num_stages=g.num_stages)

    d = t.down
    k_per_split = triton.cdiv(triton.cdiv(inter, t.down_split), d.block_k) * d.block_k
    split = triton.cdiv(inter, k_per_split)
    alloc = torch.zeros if foreign_experts else torch.empty  # foreign rows are never written
    if split == 1:
        per_slot = alloc(n, hidden, dtype=x.dtype, device=x.device)  # [N, H], weighted
    else:
        per_slot = alloc(split, n, hidden, dtype=torch.float32, device=x.device)  # partial sums over K
    w2, s2 = experts.w2, experts.w2_scale
    _down_gemv_kernel[(num_pid_m * triton.cdiv(hidden, d.block_n), split)](
        act, w2, s2, per_slot, topk_weights.float().contiguous(), sorted_ids, block_expert, total,
        n, hidden, inter, num_pid_m, k_per_split,
        act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), n * hidden,
        KIND=kind, SCALE_GROUP=group, BLOCK_M=t.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k,
        GROUP_M=t.group_m, num_warps=d.num_warps, num_stages=d.num_stages)
    if split == 1:
        return fm.combine_slots(per_slot, num_tokens, top_k, sum_slots)
    # K splits and top-k slots in one fixed-order reduction
    return per_slot.view(split, num_tokens, top_k, hidden).sum(dim=(0, 2)).to(x.dtype)


# ---- the per-assignment layout (one token): a weight tile per program, in registers -------------------
#
# With one GEMM block per assignment (fused_moe.per_assignment_alignment: one token, whose top-k and
# folded shared experts are all distinct) each (assignment, row tile) is a GEMV over its expert's
# rows. Program p holds its tile of the stored weight whole (BLOCK_N rows, K in up to three
# power-of-two chunks: no K loop) in registers, converts it to fp32 in PTX
# (quant_matmul.int4_values_f32 / int8_values_f32: no I2F, no bf16 widening) and multiplies it into
# the activation row on CUDA cores, no tensor cores, no padding of one row to sixteen.
#
# Layouts. A program is one warp (no cross-warp reduction, no barrier). The weight chunk [rows, C]
# is loaded with 4-byte vectors and the activation as a tile of the same shape [rows, C] through a
# pointer that is the same along the rows (int4: 32-bit pairs of bf16, the partners of a byte's two
# nibbles; int8: bf16 in 4-element groups), so both get the same register layout on any Triton
# (the 32 lanes along K, every row in every lane) and no layout conversion (a shared-memory round
# trip with barriers; kernels/gemv.py's x costs several) sits between load and multiply; the loads
# of equal addresses in a thread are one load. Each lane adds its products of a row up before the
# five shuffles of the row's sum.
#
# Before the PDL wait (kernels/pdl.py) each program reads what is known already:
# * gate/up: the folded shared experts' programs (their expert is the slot's, x the norm's, two
#   launches back; they come first in launch order) load their tile, and with SHARED_COMPUTE compute
#   it too; the routed programs wait for the router's ids, then read their tile.
# * down: the expert, routing weight, scales and the whole weight tile (the router is two launches
#   back); after the wait only the activation row (gate/up's) is read.
#
# Rows per tile: as many as fit ASSIGN_SLICE_BYTES of stored weight (gate/up: BLOCK_N gate rows
# and their BLOCK_N up rows, so silu(gate) * up is a local product). Per output channel scales only.

ASSIGN_SLICE_BYTES = 8 * 1024  # a warp's tile: up to 256 bytes of weight a lane


# Whether AUTO takes the per-assignment GEMVs for the one-block-per-assignment layout (one token).
# H100, 21B-A3B layer at one token (benchmarks/bench_moe_assign.py, docs/performance.md): wint4
# 31.5 -> 24.7 us, wint8 44.8 -> 37.0 us against the fused kernels; ERNIESERVE_MOE_ASSIGN_GEMV=0
# turns it off.
ASSIGN_GEMV = True


@functools.cache  # asked by every quantized MoE layer of every step: read the environment once
def assign_gemv_enabled() -> bool:
    value = os.environ.get("ERNIESERVE_MOE_ASSIGN_GEMV")
    return ASSIGN_GEMV if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


@functools.cache
def assign_shared_compute() -> bool:
    """Whether the shared experts' gate/up programs compute before the wait, not only load
    (ERNIESERVE_MOE_ASSIGN_SHARED_COMPUTE, on by default; read once)."""
    return os.environ.get("ERNIESERVE_MOE_ASSIGN_SHARED_COMPUTE", "1").strip().lower() in ("1", "true", "yes", "on")


def _stored_row_bytes(experts: QuantizedExperts, k: int) -> int:
    return (k + 1) // 2 if experts.scheme is ExpertScheme.WINT4 else k


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def assign_tiles(experts: QuantizedExperts, slice_bytes: int = ASSIGN_SLICE_BYTES) -> tuple[int, int]:
    """(gate/up BLOCK_N: gate rows per program, each with its up row; down BLOCK_N: rows per program),
    powers of two filling at most `slice_bytes` of stored weight per program (at least one)."""
    gate_up = _pow2_floor(slice_bytes // (2 * _stored_row_bytes(experts, experts.hidden)))
    down = _pow2_floor(slice_bytes // _stored_row_bytes(experts, experts.inter))
    if HAS_TRITON:
        gate_up = min(gate_up, triton.next_power_of_2(experts.inter))
        down = min(down, triton.next_power_of_2(experts.hidden))
    return gate_up, down


def assign_supported(experts: QuantizedExperts) -> bool:
    """wint8 / wint4 with one scale per output channel, H and I sums of at most three powers of two
    of at least 8 columns each (4-byte weight vectors), a stored row of at most ASSIGN_SLICE_BYTES."""
    from ernieserve.kernels.gemv import k_chunks

    if experts.scheme not in (ExpertScheme.WINT4, ExpertScheme.WINT8) or experts.group_size:
        return False
    for k in (experts.hidden, experts.inter):
        chunks = k_chunks(k)
        if chunks is None or _stored_row_bytes(experts, k) > ASSIGN_SLICE_BYTES or min(c for c in chunks if c) < 8:
            return False
    return True


if HAS_TRITON:
    from ernieserve.kernels.pdl import pdl_wait
    from ernieserve.kernels.quant_matmul import int4_values_f32, int8_values_f32

    @triton.jit
    def _by4(C: tl.constexpr):
        """0..C-1 as runs of 4 (the compiler sees contiguity 4: 4-element vectors)."""
        j = tl.arange(0, C)
        return (j // 4) * 4 + j % 4

    @triton.jit
    def _tile_chunk(w_rows, ok, START: tl.constexpr, C: tl.constexpr):
        """Stored bytes [rows, C] from column START of each row (rows where ok), in 4-byte vectors."""
        return tl.load(w_rows + START + _by4(C)[None, :], mask=ok[:, None])

    @triton.jit
    def _tile(w_rows, ok, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, INT4: tl.constexpr):
        """A tile's stored rows in chunks of K1, K2, K3 columns (bytes: halved for int4; an absent
        chunk is the first again, never read). w_rows: [rows, 1] pointers."""
        D: tl.constexpr = 2 if INT4 else 1
        w1 = _tile_chunk(w_rows, ok, 0, K1 // D)
        w2 = w1
        w3 = w1
        if K2 > 0:
            w2 = _tile_chunk(w_rows, ok, K1 // D, K2 // D)
        if K3 > 0:
            w3 = _tile_chunk(w_rows, ok, (K1 + K2) // D, K3 // D)
        return w1, w2, w3

    @triton.jit
    def _chunk_dot(w, x_row, rows, START: tl.constexpr, C: tl.constexpr, INT4: tl.constexpr,
                   INLINE_ASM: tl.constexpr):
        """fp32 [rows]: the chunk's integer values (scale not applied) times x's columns
        [START, START + C). x is loaded as a tile of w's shape and vector width, the same for every
        row, so both take one register layout."""
        same = (rows * 0)[:, None]
        if INT4:
            j = tl.arange(0, C // 2)[None, :]
            if x_row.dtype.element_ty == tl.bfloat16:  # the model's dtype
                pairs = x_row.to(tl.pointer_type(tl.int32))  # bf16 (x[2j], x[2j + 1]) as one 32-bit word
                xp = tl.load(pairs + START // 2 + same + j)
                x_even = (xp << 16).to(tl.float32, bitcast=True)
                x_odd = (xp & -65536).to(tl.float32, bitcast=True)
            else:  # fp16 / fp32 activations: the even and odd columns each
                x_even = tl.load(x_row + START + same + 2 * j).to(tl.float32)
                x_odd = tl.load(x_row + START + same + 2 * j + 1).to(tl.float32)
            low, high = int4_values_f32(w, INLINE_ASM)
            # one reduction over both nibbles' products in k order: each product is one FFMA into the
            # lane's sum, then one shuffle tree per row
            prods = tl.reshape(tl.join(low * x_even, high * x_odd), [w.shape[0], C])
            acc = tl.sum(prods, axis=1)
        else:  # (an if / else: Triton compiles the code after a constexpr branch's return too)
            xt = tl.load(x_row + START + same + _by4(C)[None, :]).to(tl.float32)
            acc = tl.sum(int8_values_f32(w, INLINE_ASM) * xt, axis=1)
        return acc

    @triton.jit
    def _tile_dot(w1, w2, w3, x_row, rows, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                  INT4: tl.constexpr, INLINE_ASM: tl.constexpr):
        acc = _chunk_dot(w1, x_row, rows, 0, K1, INT4, INLINE_ASM)
        if K2 > 0:
            acc += _chunk_dot(w2, x_row, rows, K1, K2, INT4, INLINE_ASM)
        if K3 > 0:
            acc += _chunk_dot(w3, x_row, rows, K1 + K2, K3, INT4, INLINE_ASM)
        return acc

    @triton.jit
    def _gate_up_tiles(w_ptr, s_ptr, expert, n, ok, I, up_scale_row, stride_we, stride_wn, stride_se, stride_sn,
                       K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, INT4: tl.constexpr):
        """The gate rows n and up rows I + n of `expert`, and their scales."""
        base = w_ptr + expert.to(tl.int64) * stride_we
        g1, g2, g3 = _tile(base + n.to(tl.int64)[:, None] * stride_wn, ok, K1, K2, K3, INT4)
        u1, u2, u3 = _tile(base + (n + I).to(tl.int64)[:, None] * stride_wn, ok, K1, K2, K3, INT4)
        s_base = s_ptr + expert.to(tl.int64) * stride_se
        sg = tl.load(s_base + n * stride_sn, mask=ok, other=0.0)
        su = tl.load(s_base + (n + up_scale_row) * stride_sn, mask=ok, other=0.0)
        return g1, g2, g3, u1, u2, u3, sg, su

    @triton.jit
    def _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_row, n, K1: tl.constexpr, K2: tl.constexpr,
                     K3: tl.constexpr, INT4: tl.constexpr, INLINE_ASM: tl.constexpr):
        gate = _tile_dot(g1, g2, g3, x_row, n, K1, K2, K3, INT4, INLINE_ASM) * sg
        up = _tile_dot(u1, u2, u3, x_row, n, K1, K2, K3, INT4, INLINE_ASM) * su
        return gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up, float32

    @triton.jit(do_not_specialize=["num_tokens"])
    def _gate_up_assign_kernel(
        x_ptr, ids_ptr, w_ptr, s_ptr, out_ptr, num_tokens, I, up_scale_row,
        stride_xt, stride_we, stride_wn, stride_se, stride_sn,
        TOP_K: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr,
        INT4: tl.constexpr, INLINE_ASM: tl.constexpr = False, PDL: tl.constexpr = False,
        SHARED_SLOT0: tl.constexpr = 0, SHARED_EXPERT0: tl.constexpr = 0, SHARED_COMPUTE: tl.constexpr = True,
    ):
        """act [N, I] (assignment order) = silu(x W_gate^T) * (x W_up^T) of each assignment's expert.
        SHARED_SLOT0 > 0: slots SHARED_SLOT0.. of every token are the folded shared experts
        SHARED_EXPERT0.. ; their programs come first and load (SHARED_COMPUTE: and compute) their
        tile before the wait."""
        tiles = tl.cdiv(I, BLOCK_N)
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_N)
        if SHARED_SLOT0 > 0:
            SHARED: tl.constexpr = TOP_K - SHARED_SLOT0
            shared_programs = num_tokens * SHARED * tiles
            if pid < shared_programs:
                j = pid // tiles
                n = (pid % tiles) * BLOCK_N + offs
                ok = n < I
                a = (j // SHARED) * TOP_K + SHARED_SLOT0 + j % SHARED
                x_row = x_ptr + (j // SHARED).to(tl.int64) * stride_xt
                g1, g2, g3, u1, u2, u3, sg, su = _gate_up_tiles(
                    w_ptr, s_ptr, SHARED_EXPERT0 + j % SHARED, n, ok, I, up_scale_row,
                    stride_we, stride_wn, stride_se, stride_sn, K1, K2, K3, INT4)
                if SHARED_COMPUTE:
                    act = _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_row, n, K1, K2, K3, INT4, INLINE_ASM)
                    pdl_wait(PDL)  # the output may reuse memory an earlier kernel still reads: store after it
                else:
                    pdl_wait(PDL)
                    act = _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_row, n, K1, K2, K3, INT4, INLINE_ASM)
                tl.store(out_ptr + a.to(tl.int64) * I + n, act.to(out_ptr.dtype.element_ty), mask=ok)
                return
            pid -= shared_programs
            j = pid // tiles
            a = (j // SHARED_SLOT0) * TOP_K + j % SHARED_SLOT0
        else:
            a = pid // tiles
        n = (pid % tiles) * BLOCK_N + offs
        ok = n < I
        pdl_wait(PDL)  # the router's ids: the kernel just before
        expert = tl.load(ids_ptr + a)
        g1, g2, g3, u1, u2, u3, sg, su = _gate_up_tiles(w_ptr, s_ptr, expert, n, ok, I, up_scale_row, stride_we,
                                                        stride_wn, stride_se, stride_sn, K1, K2, K3, INT4)
        act = _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_ptr + (a // TOP_K).to(tl.int64) * stride_xt, n,
                           K1, K2, K3, INT4, INLINE_ASM)
        tl.store(out_ptr + a.to(tl.int64) * I + n, act.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _down_assign_kernel(
        act_ptr, ids_ptr, tw_ptr, w_ptr, s_ptr, out_ptr, H,
        stride_we, stride_wn, stride_se, stride_sn,
        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr,
        INT4: tl.constexpr, INLINE_ASM: tl.constexpr = False, PDL: tl.constexpr = False,
        EARLY: tl.constexpr = False,
    ):
        """out [N, H] (assignment order) = routing weight x act row W_down^T of each assignment's
        expert. EARLY: the routing (the router's, two launches back: kernels/pdl.py, fused_moe's
        _down_block), the scales and the whole weight tile are read before the wait."""
        tiles = tl.cdiv(H, BLOCK_N)
        pid = tl.program_id(0)
        a = pid // tiles
        rn = (pid % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rn < H
        if not EARLY:
            pdl_wait(PDL)
        expert = tl.load(ids_ptr + a).to(tl.int64)
        wt = tl.load(tw_ptr + a)
        w1, w2, w3 = _tile(w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn, ok, K1, K2, K3, INT4)
        scale = tl.load(s_ptr + expert * stride_se + rn * stride_sn, mask=ok, other=0.0)
        if EARLY:
            pdl_wait(PDL)  # the activation row is the kernel just before's
        acc = _tile_dot(w1, w2, w3, act_ptr + a.to(tl.int64) * (K1 + K2 + K3), rn, K1, K2, K3, INT4, INLINE_ASM)
        tl.store(out_ptr + a.to(tl.int64) * H + rn, (acc * scale * wt).to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _env_tiles() -> tuple[int, int] | None:
    """ERNIESERVE_MOE_ASSIGN_TILES="GATE_UP,DOWN": the BLOCK_N pair (benchmarking; read once)."""
    value = os.environ.get("ERNIESERVE_MOE_ASSIGN_TILES", "").strip()
    if not value:
        return None
    try:
        gate_up, down = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"ERNIESERVE_MOE_ASSIGN_TILES={value!r}: expected two powers of two, e.g. 8,16") from None
    if min(gate_up, down) < 1 or gate_up & (gate_up - 1) or down & (down - 1):
        raise ValueError(f"ERNIESERVE_MOE_ASSIGN_TILES={value!r}: expected two powers of two, e.g. 8,16")
    return gate_up, down


def assignment_path(
    x: torch.Tensor,  # [T, H]
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int32, each token's ids distinct
    sum_slots: bool = True,
    shared_slots: int = 0,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:  # [T, H], or [T, K, H] with sum_slots=False
    """The per-assignment GEMV kernels above (no alignment at all: each assignment reads its own
    expert's rows, so an expert picked by two tokens is read twice; meant for one token).
    tiles: (gate/up, down) BLOCK_N, `assign_tiles`' by default."""
    from ernieserve.kernels.gemv import k_chunks

    if not assign_supported(experts):
        raise ValueError(f"the per-assignment GEMV takes per-channel wint8 / wint4 experts whose H and I "
                         f"split into at most three powers of two, not {experts.scheme.value} "
                         f"(group {experts.group_size}, H {experts.hidden}, I {experts.inter})")
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    assert hidden == experts.hidden, f"x has {hidden} features, the experts {experts.hidden}"
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous(), "the router's int32 ids"
    x = x.contiguous()
    inter = experts.inter
    bn_gate_up, bn_down = tiles or _env_tiles() or assign_tiles(experts)
    int4 = experts.scheme is ExpertScheme.WINT4
    inline_asm = x.device.type == "cuda"  # compiled code (the interpreter cannot run inline PTX)
    pdl = pdl_launch(pdl_enabled(x.device))
    early = {}
    if shared_slots and fm.shared_early():
        early = {"SHARED_SLOT0": top_k - shared_slots, "SHARED_EXPERT0": experts.num_experts - shared_slots,
                 "SHARED_COMPUTE": assign_shared_compute()}

    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, I], assignment order
    w13, s13 = experts.w13, experts.w13_scale
    k1, k2, k3 = k_chunks(hidden)
    _gate_up_assign_kernel[(n * triton.cdiv(inter, bn_gate_up),)](
        x, topk_ids, w13, s13, act, num_tokens, inter, experts.up_scale_row,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        TOP_K=top_k, K1=k1, K2=k2, K3=k3, BLOCK_N=bn_gate_up, INT4=int4, INLINE_ASM=inline_asm,
        num_warps=1, num_stages=1, **early, **pdl)

    per_slot = torch.empty(n, hidden, dtype=x.dtype, device=x.device)  # [N, H], weighted
    w2, s2 = experts.w2, experts.w2_scale
    weights = topk_weights if topk_weights.dtype == torch.float32 and topk_weights.is_contiguous() \
        else topk_weights.float().contiguous()
    k1, k2, k3 = k_chunks(inter)
    _down_assign_kernel[(n * triton.cdiv(hidden, bn_down),)](
        act, topk_ids, weights, w2, s2, per_slot, hidden,
        w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        K1=k1, K2=k2, K3=k3, BLOCK_N=bn_down, INT4=int4, INLINE_ASM=inline_asm,
        EARLY=fm.down_early(), num_warps=1, num_stages=1, **pdl)
    return fm.combine_slots(per_slot, num_tokens, top_k, sum_slots)
