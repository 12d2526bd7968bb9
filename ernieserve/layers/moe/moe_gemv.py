"""Per-assignment GEMVs for weight-only quantized routed experts (wint4, wint8) at one token.

At one token an expert sees one assignment, so its work is a weight stream, not a matmul. The
fused path (`fused_moe_quant.py`) still feeds tensor cores: it pads each expert's one row to
BLOCK_M >= 16 and sends every dequantized weight tile through shared memory to `tl.dot`. Here
there is no dot (see the section below): AUTO takes these kernels when MoEBlock gives the one-block-
per-assignment alignment (`fused_moe.per_assignment_alignment`), `QuantMoEPath.ASSIGN`.

An earlier design here (a K loop over tiles of up to 8 rows per expert, the align kernel's sorted
layout, `QuantMoEPath.GEMV`) lost to the fused kernels at every token count once those converted
int4 with inline PTX (H100, docs/performance.md, 2026-11-22): it was never taken and is gone.
"""

from __future__ import annotations

import functools
import os

import torch

from ernieserve.kernels.pdl import pdl_enabled, pdl_launch
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.layers.moe.fused_moe import HAS_TRITON
from ernieserve.layers.moe.fused_moe_quant import ExpertScheme, QuantizedExperts

if HAS_TRITON:
    import triton
    import triton.language as tl


# ---- the per-assignment layout (one token): a weight tile per program, in registers -------------------
#
# With one GEMM block per assignment (fused_moe.per_assignment_alignment: one token, whose top-k and
# folded shared experts are all distinct) each (assignment, row tile) is a GEMV over its expert's
# rows. Program p holds its tile of the stored weight whole (BLOCK_N rows, K in up to three
# power-of-two chunks: no K loop) in registers and multiplies it into the activation row on CUDA
# cores, no tensor cores, no padding of one row to sixteen: int4 with bf16 activations (PACKED) in
# packed bf16x2, four products summed in bf16 and the rest in fp32 (quant_matmul.int4_dot4); int8,
# and int4 with other activations, converted to fp32 in PTX (quant_matmul.int4_values_f32 /
# int8_values_f32: no I2F, no bf16 widening) and summed in fp32.
#
# Layouts. A program is one warp (no cross-warp reduction, no barrier). The weight chunk [rows, C]
# is loaded with 4-byte vectors and the activation as a tile of the same shape [rows, C] through a
# pointer that is the same along the rows (int4: 32-bit pairs of bf16, the partners of a byte's two
# nibbles; int8: bf16 in 4-element groups; PACKED: per element a 16-bit pair of weight bytes and the
# 64-bit word of its 4 bf16 activations, two elements a vector), so both get the same register
# layout on any Triton
# (the 32 lanes along K, every row in every lane) and no layout conversion (a shared-memory round
# trip with barriers; kernels/gemv.py's x costs several) sits between load and multiply; the loads
# of equal addresses in a thread are one load. Each lane adds its products of a row up before the
# five shuffles of the row's sum.
#
# Before the PDL wait (kernels/pdl.py) each program reads what is known already:
# * gate/up: the folded shared experts' programs (their expert is the slot's, x the norm's, two
#   launches back; they come first in launch order) load their tile, and with SHARED_COMPUTE compute
#   it too (assign_shared_compute); the routed programs wait for the router's ids, then read their tile.
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

# Whether int4 with bf16 activations takes the packed bf16x2 products (quant_matmul.int4_dot4) rather
# than the fp32 conversion (int4_values_f32). H100, 21B-A3B layer at one token: 24.6 -> 20.7 us;
# batch-1 wint4 decode 1.657 -> 1.585 ms (docs/performance.md).
ASSIGN_PACKED = True


@functools.cache  # asked by every quantized MoE layer of every step: read the environment once
def assign_gemv_enabled() -> bool:
    value = os.environ.get("ERNIESERVE_MOE_ASSIGN_GEMV")
    return ASSIGN_GEMV if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


def _env_switch(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def assign_packed() -> bool:
    """Whether int4 with bf16 activations multiplies in packed bf16x2 (quant_matmul.int4_dot4;
    ERNIESERVE_MOE_ASSIGN_PACKED, on by default; read once)."""
    return _env_switch("ERNIESERVE_MOE_ASSIGN_PACKED", ASSIGN_PACKED)


@functools.cache
def assign_shared_compute(packed: bool) -> bool:
    """Whether the shared experts' gate/up programs compute before the wait, not only load
    (ERNIESERVE_MOE_ASSIGN_SHARED_COMPUTE; read once). By default only without the packed products:
    with them, computing during the router slowed the router more than it saved (H100, 21B-A3B
    wint4 batch-1 decode 1.581 ms on, 1.520 off; without them it measured even, 1.653-1.668 on
    against 1.671 off)."""
    return _env_switch("ERNIESERVE_MOE_ASSIGN_SHARED_COMPUTE", not packed)


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
    from ernieserve.kernels.quant_matmul import int4_packed_dot, int4_pairs_load, int4_values_f32, int8_values_f32

    @triton.jit
    def _by4(C: tl.constexpr):
        """0..C-1 as runs of 4 (the compiler sees contiguity 4: 4-element vectors)."""
        j = tl.arange(0, C)
        return (j // 4) * 4 + j % 4

    @triton.jit
    def _tile_chunk(w_rows, ok, START: tl.constexpr, C: tl.constexpr, PACKED: tl.constexpr):
        """Stored bytes [rows, C] from byte START of each row (rows where ok), in 4-byte vectors; PACKED:
        as uint16 [rows, C / 2] (4 nibbles each), two to a vector."""
        if PACKED:
            return int4_pairs_load(w_rows, ok, START, C)
        else:
            return tl.load(w_rows + START + _by4(C)[None, :], mask=ok[:, None])

    @triton.jit
    def _tile(w_rows, ok, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, INT4: tl.constexpr,
              PACKED: tl.constexpr):
        """A tile's stored rows in chunks of K1, K2, K3 columns (bytes: halved for int4; an absent
        chunk is the first again, never read). w_rows: [rows, 1] pointers."""
        D: tl.constexpr = 2 if INT4 else 1
        w1 = _tile_chunk(w_rows, ok, 0, K1 // D, PACKED)
        w2 = w1
        w3 = w1
        if K2 > 0:
            w2 = _tile_chunk(w_rows, ok, K1 // D, K2 // D, PACKED)
        if K3 > 0:
            w3 = _tile_chunk(w_rows, ok, (K1 + K2) // D, K3 // D, PACKED)
        return w1, w2, w3

    @triton.jit
    def _chunk_dot(w, x_row, rows, START: tl.constexpr, C: tl.constexpr, INT4: tl.constexpr,
                   INLINE_ASM: tl.constexpr, PACKED: tl.constexpr):
        """fp32 [rows]: the chunk's integer values (scale not applied) times x's columns
        [START, START + C). x is loaded as a tile of w's shape and vector width, the same for every
        row, so both take one register layout."""
        same = (rows * 0)[:, None]
        if PACKED:  # int4, bf16 x: 4 columns an element (uint16 of weight, int64 of x), bf16x2 products
            acc = int4_packed_dot(w, x_row, START, C, INLINE_ASM)
        elif INT4:
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
                  INT4: tl.constexpr, INLINE_ASM: tl.constexpr, PACKED: tl.constexpr):
        acc = _chunk_dot(w1, x_row, rows, 0, K1, INT4, INLINE_ASM, PACKED)
        if K2 > 0:
            acc += _chunk_dot(w2, x_row, rows, K1, K2, INT4, INLINE_ASM, PACKED)
        if K3 > 0:
            acc += _chunk_dot(w3, x_row, rows, K1 + K2, K3, INT4, INLINE_ASM, PACKED)
        return acc

    @triton.jit
    def _gate_up_tiles(w_ptr, s_ptr, expert, n, ok, I, up_scale_row, stride_we, stride_wn, stride_se, stride_sn,
                       K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, INT4: tl.constexpr,
                       PACKED: tl.constexpr):
        """The gate rows n and up rows I + n of `expert`, and their scales."""
        base = w_ptr + expert.to(tl.int64) * stride_we
        g1, g2, g3 = _tile(base + n.to(tl.int64)[:, None] * stride_wn, ok, K1, K2, K3, INT4, PACKED)
        u1, u2, u3 = _tile(base + (n + I).to(tl.int64)[:, None] * stride_wn, ok, K1, K2, K3, INT4,
                           PACKED)
        s_base = s_ptr + expert.to(tl.int64) * stride_se
        sg = tl.load(s_base + n * stride_sn, mask=ok, other=0.0)
        su = tl.load(s_base + (n + up_scale_row) * stride_sn, mask=ok, other=0.0)
        return g1, g2, g3, u1, u2, u3, sg, su

    @triton.jit
    def _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_row, n, K1: tl.constexpr, K2: tl.constexpr,
                     K3: tl.constexpr, INT4: tl.constexpr, INLINE_ASM: tl.constexpr, PACKED: tl.constexpr):
        gate = _tile_dot(g1, g2, g3, x_row, n, K1, K2, K3, INT4, INLINE_ASM, PACKED) * sg
        up = _tile_dot(u1, u2, u3, x_row, n, K1, K2, K3, INT4, INLINE_ASM, PACKED) * su
        return gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up, float32

    @triton.jit(do_not_specialize=["num_tokens"])
    def _gate_up_assign_kernel(
        x_ptr, ids_ptr, w_ptr, s_ptr, out_ptr, num_tokens, I, up_scale_row,
        stride_xt, stride_we, stride_wn, stride_se, stride_sn,
        TOP_K: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr,
        INT4: tl.constexpr, INLINE_ASM: tl.constexpr = False, PACKED: tl.constexpr = False,
        PDL: tl.constexpr = False, SHARED_SLOT0: tl.constexpr = 0, SHARED_EXPERT0: tl.constexpr = 0,
        SHARED_COMPUTE: tl.constexpr = True,
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
                    stride_we, stride_wn, stride_se, stride_sn, K1, K2, K3, INT4, PACKED)
                if SHARED_COMPUTE:
                    act = _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_row, n, K1, K2, K3, INT4, INLINE_ASM,
                                       PACKED)
                    pdl_wait(PDL)  # the output may reuse memory an earlier kernel still reads: store after it
                else:
                    pdl_wait(PDL)
                    act = _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_row, n, K1, K2, K3, INT4, INLINE_ASM,
                                       PACKED)
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
                                                        stride_wn, stride_se, stride_sn, K1, K2, K3, INT4, PACKED)
        act = _gate_up_act(g1, g2, g3, u1, u2, u3, sg, su, x_ptr + (a // TOP_K).to(tl.int64) * stride_xt, n,
                           K1, K2, K3, INT4, INLINE_ASM, PACKED)
        tl.store(out_ptr + a.to(tl.int64) * I + n, act.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _down_assign_kernel(
        act_ptr, ids_ptr, tw_ptr, w_ptr, s_ptr, out_ptr, H,
        stride_we, stride_wn, stride_se, stride_sn,
        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, BLOCK_N: tl.constexpr,
        INT4: tl.constexpr, INLINE_ASM: tl.constexpr = False, PACKED: tl.constexpr = False,
        PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
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
        w1, w2, w3 = _tile(w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn, ok, K1, K2, K3,
                            INT4, PACKED)
        scale = tl.load(s_ptr + expert * stride_se + rn * stride_sn, mask=ok, other=0.0)
        if EARLY:
            pdl_wait(PDL)  # the activation row is the kernel just before's
        acc = _tile_dot(w1, w2, w3, act_ptr + a.to(tl.int64) * (K1 + K2 + K3), rn, K1, K2, K3, INT4, INLINE_ASM,
                        PACKED)
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
    # 8-byte loads of x (4 bf16 columns) and 4-byte ones of weight (uint16 pairs): H and I are
    # multiples of 8 (assign_supported), so the rows keep the base pointers' alignment
    packed = (int4 and x.dtype == torch.bfloat16 and assign_packed() and x.data_ptr() % 16 == 0
              and experts.w13.data_ptr() % 4 == 0 and experts.w2.data_ptr() % 4 == 0)
    pdl = pdl_launch(pdl_enabled(x.device))
    early = {}
    if shared_slots and fm.shared_early():
        early = {"SHARED_SLOT0": top_k - shared_slots, "SHARED_EXPERT0": experts.num_experts - shared_slots,
                 "SHARED_COMPUTE": assign_shared_compute(packed)}

    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, I], assignment order
    w13, s13 = experts.w13, experts.w13_scale
    k1, k2, k3 = k_chunks(hidden)
    _gate_up_assign_kernel[(n * triton.cdiv(inter, bn_gate_up),)](
        x, topk_ids, w13, s13, act, num_tokens, inter, experts.up_scale_row,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        TOP_K=top_k, K1=k1, K2=k2, K3=k3, BLOCK_N=bn_gate_up, INT4=int4, INLINE_ASM=inline_asm,
        PACKED=packed, num_warps=1, num_stages=1, **early, **pdl)

    per_slot = torch.empty(n, hidden, dtype=x.dtype, device=x.device)  # [N, H], weighted
    w2, s2 = experts.w2, experts.w2_scale
    weights = topk_weights if topk_weights.dtype == torch.float32 and topk_weights.is_contiguous() \
        else topk_weights.float().contiguous()
    k1, k2, k3 = k_chunks(inter)
    _down_assign_kernel[(n * triton.cdiv(hidden, bn_down),)](
        act, topk_ids, weights, w2, s2, per_slot, hidden,
        w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        K1=k1, K2=k2, K3=k3, BLOCK_N=bn_down, INT4=int4, INLINE_ASM=inline_asm, PACKED=packed,
        EARLY=fm.down_early(), num_warps=1, num_stages=1, **pdl)
    return fm.combine_slots(per_slot, num_tokens, top_k, sum_slots)
