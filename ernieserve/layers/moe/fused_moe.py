"""The routed-expert computation: a plain-torch reference and a fused Triton path.

Both compute, for every token t and each of its top_k assignments (expert e, weight w),
``out[t] += w * down_e(silu(gate_e(x[t])) * up_e(x[t]))`` with the stacked expert weights
``w13 [E, 2I, H]`` (gate rows first, then up rows, as HF's `gate_up_proj`) and ``w2 [E, H, I]``.

The fused path runs four Triton launches and one reduction, with no host sync and no allocation
whose size depends on the routing, so it can be captured in a CUDA graph:

1. `_moe_align_kernel` (grid: one program per expert). Counts assignments per expert, lays the
   experts out one after another in a flat array padded per expert to a multiple of BLOCK_M,
   writes each assignment's index (token * top_k + slot) into its expert's segment
   (`sorted_ids`, padding = N), the expert of every BLOCK_M block (`block_expert`) and the padded
   total. Sizes use the bound N + min(N, E) * (BLOCK_M - 1), known from shapes alone. At decode
   sizes the router's launch can write the same outputs instead (`triton_route_align`, behind
   ROUTE_ALIGN_MAX_TOKENS, off by default), and the GEMMs take them as `alignment`.
2. `_gate_up_kernel`: grouped GEMM over those blocks. Each program gathers BLOCK_M token rows of
   x, multiplies by one expert's gate and up tiles (two accumulators sharing the A tile), applies
   silu(gate) * up in float32 and stores the activation in assignment order: `inter [N, I]`.
3. `_down_kernel`: the same block walk over `inter` and w2, scaled by the routing weight in the
   epilogue, stored per assignment: `[N, H]`.
4. `.view(T, top_k, H).sum(1)`: the weighted combine in token order, in a fixed order (no atomics,
   so results do not depend on the batch's other tokens' scheduling). Or not here: with
   `sum_slots=False` the per-slot view goes to the next RMSNorm, which adds the slots as it loads
   its row (kernels/fused_norm.py), one launch fewer per MoE layer.

Blocks past the padded total exit at once, so the grid is sized from the bound, not the routing.

At one token (`STATIC_ALIGN_MAX_TOKENS`) there is no align step: `per_assignment_alignment` gives
each assignment its own block (block_expert is a view of the router's ids), and the blocks of the
folded shared experts, whose expert is known from the slot, compute their gate/up tile before the
PDL wait while the router still runs (`SHARED_EARLY`); the down GEMM reads its block's routing
before its wait (`DOWN_EARLY`). H100, 21B-A3B batch-1 bf16 decode (docs/performance.md): the
layout 3.078 -> 3.045 ms, the down GEMM's early reads -> 3.015; on another machine, with the later
changes, the shared experts' early blocks 3.021 -> 2.914.

Quantized experts (wint8, wint4, fp8, block_wise_fp8) run the same align kernel and block walk in
`fused_moe_quant.py`, whose GEMMs load the stored weight tiles and dequantize them in the K loop.

The routing that precedes them (router.py) is also here: `triton_select_experts` routes given
logits; `triton_route`, for decode-sized batches, computes the gate's logits split over ~256
programs and routes them in the same launch (the split-K ticket of kernels/split_k.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ernieserve.kernels import split_k
from ernieserve.kernels.pdl import pdl_enabled, pdl_launch

if TYPE_CHECKING:
    from ernieserve.layers.moe.router import RouterConfig

try:
    import triton
    import triton.language as tl

    from ernieserve.kernels.pdl import pdl_wait

    HAS_TRITON = True
except ImportError:  # CPU-only installs serve through the torch reference
    HAS_TRITON = False


# ---- plain-torch reference (the oracle, and the CPU path) ----------------------------------------

def fused_moe_ref(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
) -> torch.Tensor:  # [T, H]
    """Loops over the experts that received tokens, like HF's `Ernie4_5_MoeExperts.forward`."""
    num_experts, inter = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1).long()  # [T * K]
    # HF multiplies by the weights cast to the activations' dtype
    flat_w = topk_weights.reshape(-1).to(x.dtype)
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
    # ids == num_experts: another rank's experts (expert parallelism), sorted last and skipped
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()[:num_experts]
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        idx = order[start:start + count]  # [count] assignment indices
        start += count
        tokens = idx // top_k
        h = torch.nn.functional.linear(x[tokens], w13[e])  # [count, 2I]
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = torch.nn.functional.linear(act, w2[e]) * flat_w[idx, None]  # [count, H]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


# ---- tile configuration -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GemmTile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class MoETileConfig:
    block_m: int  # rows per expert block; shared by both GEMMs (the alignment is done once)
    gate_up: GemmTile
    down: GemmTile
    group_m: int = 8


def choose_tile_config(num_assignments: int, num_experts: int) -> MoETileConfig:
    """Tiles by the mean rows per expert: small M is a weight stream, large M a real GEMM."""
    # Picked by benchmarks/bench_moe.py --sweep on an H100 at the 21B-A3B shape (H 2560, I 1536):
    # decode tiles reach 2.5-3.0 TB/s of weight reads, the prefill tiles about 380 TFLOP/s.
    rows = num_assignments / max(1, min(num_experts, num_assignments))
    if rows <= 16:
        return MoETileConfig(16, GemmTile(32, 128, 4, 4), GemmTile(128, 128, 4, 3))
    if rows <= 48:
        return MoETileConfig(32, GemmTile(64, 128, 4, 4), GemmTile(128, 128, 4, 3))
    if rows <= 192:
        return MoETileConfig(64, GemmTile(64, 64, 4, 4), GemmTile(128, 64, 4, 4))
    return MoETileConfig(128, GemmTile(128, 64, 8, 3), GemmTile(256, 64, 8, 3))


# Shared memory a Triton GEMM of these tiles pipelines (operand tiles x stages) must stay under the
# device's limit (227 KiB on Hopper); the tiles above are sized for 2-byte operands.
_SMEM_BUDGET = 200 * 1024


def fit_tile(tile: GemmTile, block_m: int, b_tiles: int, elem_bytes: int) -> GemmTile:
    """The tile with fewer pipeline stages (then a shorter K step) until its operand buffers fit:
    float32 operands need twice the bytes of the bf16 tiles chosen by the sweep."""
    stages, block_k = tile.num_stages, tile.block_k

    def need() -> int:
        return stages * (block_m + b_tiles * tile.block_n) * block_k * elem_bytes

    while need() > _SMEM_BUDGET and stages > 2:
        stages -= 1
    while need() > _SMEM_BUDGET and block_k > 16:
        block_k //= 2
    return GemmTile(tile.block_n, block_k, tile.num_warps, stages)


def padded_capacity(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the per-expert padded length: at most min(N, E) experts get a partial block."""
    return num_assignments + min(num_assignments, num_experts) * (block_m - 1)


if HAS_TRITON:

    @triton.jit
    def _topk_rows(
        lg, rows, row_ok, bias_ptr, weights_ptr, ids_ptr, E, norm_min,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, N_SHARED: tl.constexpr,
    ):
        """Routes the rows of float32 logits `lg` [BLOCK_T, E_PAD] (columns >= E ignored): softmax,
        top-k of softmax (+ bias), renormalisation, folded shared experts; stores rows < T of the
        weights and ids [T, TOP_K + N_SHARED]. Shared by both router kernels, so they route alike.
        Returns the ids tile [BLOCK_T, K_PAD] (columns >= TOP_K + N_SHARED hold 0) for a caller that
        aligns them in the same program (_align_rows)."""
        cols = tl.arange(0, E_PAD)
        col_ok = cols < E
        lg = tl.where(col_ok[None, :], lg, float("-inf"))  # [BLOCK_T, E_PAD]
        ex = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        probs = ex / tl.sum(ex, axis=1)[:, None]
        scores = probs
        if HAS_BIAS:
            scores = probs + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        kcols = tl.arange(0, K_PAD)
        w_tile = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        id_tile = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(scores, axis=1)  # [BLOCK_T], first index on ties
            hit = cols[None, :] == best[:, None]
            w = tl.sum(tl.where(hit, probs, 0.0), axis=1)
            w_tile = tl.where(kcols[None, :] == j, w[:, None], w_tile)
            id_tile = tl.where(kcols[None, :] == j, best[:, None].to(tl.int32), id_tile)
            scores = tl.where(hit, float("-inf"), scores)
        if RENORM:
            w_tile = w_tile / tl.maximum(tl.sum(w_tile, axis=1), norm_min)[:, None]
        if N_SHARED > 0:  # shared experts folded in as experts E.. E + N_SHARED - 1, weight 1, every token
            shared = (kcols[None, :] >= TOP_K) & (kcols[None, :] < TOP_K + N_SHARED)
            w_tile = tl.where(shared, 1.0, w_tile)
            id_tile = tl.where(shared, (E + kcols[None, :] - TOP_K).to(tl.int32), id_tile)
        out = rows[:, None] * (TOP_K + N_SHARED) + kcols[None, :]
        mask = row_ok[:, None] & (kcols[None, :] < TOP_K + N_SHARED)
        tl.store(weights_ptr + out, w_tile, mask=mask)
        tl.store(ids_ptr + out, id_tile, mask=mask)
        return id_tile

    @triton.jit
    def _align_rows(
        id_tile, T, E_ALIGN, sorted_ptr, block_expert_ptr, total_ptr,
        K_TOT: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
        EXPERT_BLOCKS: tl.constexpr,
    ):
        """What _moe_align_kernel writes for these ids, from the ids tile in registers (the router's
        last program, T * K_PAD <= ROUTE_ALIGN_MAX_SLOTS): the padded total, block_expert for every
        block below it and sorted_ids[:total]. Assignment a = row * K_TOT + slot; ids >= E_ALIGN
        (none from the router; the align kernel's spare bin) are left out as there.

        No histogram over the experts: each assignment i compares itself with every other j (a
        [P, P] tile, P = BLOCK_T * K_PAD <= 64): its rank among its expert's assignments (those of
        smaller index), its expert's count, and, counting each expert once at its first assignment,
        the padded sizes of the experts with smaller ids, i.e. its segment's start. Every position
        below the total is written once: an assignment at segment start + rank; the first
        assignment of each expert writes its padding (N) and its blocks' block_expert entries."""
        P: tl.constexpr = BLOCK_T * K_PAD
        ids = tl.reshape(id_tile, (P,))  # p = row * K_PAD + slot (row-major, no reordering)
        p = tl.arange(0, P)
        row = p // K_PAD
        slot = p % K_PAD
        a = row * K_TOT + slot  # the assignment index, as topk_ids.reshape(-1)
        ok = (row < T) & (slot < K_TOT) & (ids < E_ALIGN)
        same = (ids[:, None] == ids[None, :]) & ok[None, :]  # [i, j]: j is a real assignment of i's expert
        rank = tl.sum((same & (a[None, :] < a[:, None])).to(tl.int32), axis=1)
        count = tl.sum(same.to(tl.int32), axis=1)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        first = ok & (rank == 0)  # one per expert with assignments
        before = first[None, :] & (ids[None, :] < ids[:, None])  # [i, j]: j heads an expert before i's
        seg = tl.sum(tl.where(before, padded[None, :], 0), axis=1)
        tl.store(total_ptr, tl.sum(tl.where(first, padded, 0), axis=0))
        tl.store(sorted_ptr + seg + rank, a, mask=ok)
        pad = tl.arange(0, BLOCK_M)
        n_fill = tl.zeros([P, BLOCK_M], dtype=tl.int32) + T * K_TOT  # padding = N
        tl.store(sorted_ptr + (seg + count)[:, None] + pad[None, :], n_fill,
                 mask=first[:, None] & (pad[None, :] < (padded - count)[:, None]))
        blk = tl.arange(0, EXPERT_BLOCKS)  # an expert's blocks: at most cdiv(P, BLOCK_M)
        tl.store(block_expert_ptr + (seg // BLOCK_M)[:, None] + blk[None, :],
                 ids[:, None] + tl.zeros([P, EXPERT_BLOCKS], dtype=tl.int32),
                 mask=first[:, None] & (blk[None, :] < (padded // BLOCK_M)[:, None]))

    # Counts that change from step to step are not specialised: Triton would otherwise compile
    # a variant for each of their classes (1, a multiple of 16, other) at first use, mid-serving.
    @triton.jit(do_not_specialize=["T"])
    def _topk_softmax_kernel(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr,
        T, E, stride_t, norm_min,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, N_SHARED: tl.constexpr, PDL: tl.constexpr = False,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, E_PAD)
        row_ok = rows < T
        pdl_wait(PDL)  # the logits are the gate GEMM's
        lg = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                     mask=row_ok[:, None] & (cols < E)[None, :], other=0.0).to(tl.float32)
        _topk_rows(lg, rows, row_ok, bias_ptr, weights_ptr, ids_ptr, E, norm_min,
                   TOP_K, K_PAD, E_PAD, BLOCK_T, HAS_BIAS, RENORM, N_SHARED)

    @triton.jit(do_not_specialize=["T"])
    def _route_kernel(
        x_ptr, w_ptr, bias_ptr, ws_ptr, counter_ptr, weights_ptr, ids_ptr,
        sorted_ptr, block_expert_ptr, total_ptr,  # ALIGN's outputs (unused pointers without it)
        T, E, H, split_len, stride_xt, stride_we, norm_min,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, SPLITS: tl.constexpr, RELOAD: tl.constexpr,
        HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, N_SHARED: tl.constexpr,
        ALIGN: tl.constexpr = False, BLOCK_M: tl.constexpr = 16, EXPERT_BLOCKS: tl.constexpr = 1,
        PDL: tl.constexpr = False,
    ):
        # Grid (E blocks, SPLITS): program (pe, s) computes the partial logits of all T <= BLOCK_T
        # tokens for experts [pe * BLOCK_E, +BLOCK_E) over hidden range [s * split_len, +split_len).
        rows = tl.arange(0, BLOCK_T)
        row_ok = rows < T
        experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = experts < E
        split = tl.program_id(1)
        h_begin = split * split_len
        h_end = tl.minimum(h_begin + split_len, H)
        offs_h = tl.arange(0, BLOCK_H)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xt
        w_rows = w_ptr + experts[:, None].to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        if PDL:
            # The gate is a weight: the first (at decode sizes, mostly the only) step's gate tile is
            # loaded before the wait, while the previous kernel (the norm that makes x) finishes; x,
            # the workspace and the ticket counter only after it. Same operations, same order.
            hh = h_begin + offs_h
            h_ok = hh < h_end
            w = tl.load(w_rows + hh[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            pdl_wait(PDL)
            x = tl.load(x_rows + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            h_first = h_begin + BLOCK_H
        else:
            h_first = h_begin
        for h0 in range(h_first, h_end, BLOCK_H):  # one step at decode sizes (route_tiles)
            hh = h0 + offs_h
            h_ok = hh < h_end
            # x in its own dtype (bf16), the gate in its stored one (fp32 for ERNIE), both to fp32 here
            x = tl.load(x_rows + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_rows + hh[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # [BLOCK_T, BLOCK_E]
        # the split-K ticket (kernels/split_k.py): partials to the workspace [SPLITS + 1, T, E], and
        # the last program of the whole grid adds them and routes
        part = rows[:, None] * E + experts[None, :]
        tl.store(ws_ptr + split * T * E + part, acc, mask=row_ok[:, None] & e_ok[None, :])
        tl.debug_barrier()  # every thread's partial is written before one thread takes the ticket
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) * SPLITS - 1:
            # every split's partial of every row in one load (past L1), added by one tl.sum: its
            # order is fixed by the compiled layout, so results do not depend on scheduling. A load
            # per split in a loop would wait out one L2 round trip each.
            splits = tl.arange(0, SPLITS)
            cols = tl.arange(0, E_PAD)
            ptrs = ws_ptr + splits[:, None, None] * (T * E) + rows[None, :, None] * E + cols[None, None, :]
            mask = row_ok[None, :, None] & (cols < E)[None, None, :]
            lg = tl.sum(tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)  # [BLOCK_T, E_PAD]
            if RELOAD:
                # The sum comes out in a slice of the 3-D load's layout, on which the top-k's row
                # reductions got slow with the rows (H100: 1 us at one row, 24 us at 16). Through
                # the workspace's last slot and back as a plain 2-D load they cost ~1.4 us more at
                # one row but ~20 us less at 16, so from 4 rows up (route_tiles).
                lg_ptrs = ws_ptr + SPLITS * T * E + rows[:, None] * E + cols[None, :]
                lg_mask = row_ok[:, None] & (cols < E)[None, :]
                tl.store(lg_ptrs, lg, mask=lg_mask)
                tl.debug_barrier()  # the block's global writes are visible to all its threads after it
                lg = tl.load(lg_ptrs, mask=lg_mask, other=0.0, cache_modifier=".cg")
            id_tile = _topk_rows(lg, rows, row_ok, bias_ptr, weights_ptr, ids_ptr, E, norm_min,
                                 TOP_K, K_PAD, E_PAD, BLOCK_T, HAS_BIAS, RENORM, N_SHARED)
            if ALIGN:
                # moe_align's outputs for these ids, for the experts and folded shared experts
                # (E + N_SHARED, the w13 stack's): its launch is saved (triton_route_align). After
                # the PDL wait like every store here: the previous layer's GEMMs read these buffers
                _align_rows(id_tile, T, E + N_SHARED, sorted_ptr, block_expert_ptr, total_ptr,
                            TOP_K + N_SHARED, K_PAD, BLOCK_T, BLOCK_M, EXPERT_BLOCKS)
            tl.atomic_xchg(counter_ptr, 0)  # clean for the next launch (and CUDA graph replay)

    @triton.jit(do_not_specialize=["N"])
    def _moe_align_kernel(
        ids_ptr, sorted_ptr, block_expert_ptr, total_ptr, N, E,
        BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False,
    ):
        e = tl.program_id(0)
        bins = tl.arange(0, NUM_BINS)
        # the ids are the router's; sorted_ids / block_expert / total may still be read by the
        # previous step's (or layer's) GEMMs until they complete: wait before loads and stores
        pdl_wait(PDL)
        # every program counts all experts: it needs the padded sizes of the experts before it
        counts = tl.zeros([NUM_BINS], dtype=tl.int32)
        for start in range(0, N, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < N, other=E).to(tl.int32)  # E = spare bin
            counts += tl.histogram(ids, NUM_BINS)
        padded = tl.where(bins < E, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        seg_start = tl.sum(tl.where(bins < e, padded, 0))
        count_e = tl.sum(tl.where(bins == e, counts, 0))
        padded_e = tl.sum(tl.where(bins == e, padded, 0))
        tl.store(total_ptr, tl.sum(padded), mask=e == 0)
        # this expert's assignments, in index order, at the head of its segment
        running = count_e * 0
        for start in range(0, N, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < N, other=E).to(tl.int32)
            hit = (ids == e).to(tl.int32)
            rank = running + tl.cumsum(hit, 0) - 1
            tl.store(sorted_ptr + seg_start + rank, offs, mask=hit == 1)
            running += tl.sum(hit)
        pad = tl.arange(0, BLOCK_M)
        tl.store(sorted_ptr + seg_start + count_e + pad, tl.zeros([BLOCK_M], dtype=tl.int32) + N,
                 mask=pad < padded_e - count_e)
        first_block = seg_start // BLOCK_M
        num_blocks = padded_e // BLOCK_M
        for b in range(0, num_blocks, CHUNK):
            bo = b + tl.arange(0, CHUNK)
            tl.store(block_expert_ptr + first_block + bo, tl.zeros([CHUNK], dtype=tl.int32) + e,
                     mask=bo < num_blocks)

    @triton.jit
    def _block_coords(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped program order: GROUP_M blocks of rows share each weight tile while it is in L2."""
        pid = tl.program_id(0)
        per_group = GROUP_M * num_pid_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _gate_up_tile(x_ptr, w_ptr, expert, tokens, row_ok, offs_n, n_ok, H, I, stride_xt, stride_we, stride_wn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        """silu(gate) * up of one block's token rows and BLOCK_N intermediate columns, float32."""
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + I * stride_wn  # up rows follow the gate rows
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, float32

    @triton.jit(do_not_specialize=["N", "num_pid_m"])
    def _gate_up_kernel(
        x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, total_ptr,
        N, H, I, num_pid_m, stride_xt, stride_we, stride_wn,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr = False,
        SHARED_SLOT0: tl.constexpr = 0, SHARED_EXPERT0: tl.constexpr = 0,
    ):
        """SHARED_SLOT0 > 0: the alignment is one block per assignment (per_assignment_alignment) and
        slots SHARED_SLOT0.. of every token are the folded shared experts SHARED_EXPERT0.. : their
        blocks know their expert, token and row without the router, and x (the norm's, two launches
        back: it has completed, see kernels/pdl.py) is there too, so they compute their whole tile
        before the PDL wait, while the router still runs, and only store after it. The routed blocks
        wait for the router's ids first."""
        pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        if SHARED_SLOT0 > 0:
            slot = pid_m % TOP_K
            if slot >= SHARED_SLOT0:  # a shared expert's block: all of it before the wait
                ids = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, N)  # its one assignment at its head
                row_ok = ids < N
                expert = (slot - SHARED_SLOT0 + SHARED_EXPERT0).to(tl.int64)
                act = _gate_up_tile(x_ptr, w_ptr, expert, (ids // TOP_K).to(tl.int64), row_ok, offs_n, n_ok,
                                    H, I, stride_xt, stride_we, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K,
                                    DOT_PRECISION, DOT_FP32)
                pdl_wait(PDL)  # the output may reuse memory an earlier kernel still touches: store after it
                out_ptrs = out_ptr + ids[:, None].to(tl.int64) * I + offs_n[None, :]
                tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
                return
        # before the padded total (the align kernel's): every program waits, the spare ones too
        pdl_wait(PDL)
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] assignments
        row_ok = ids < N
        act = _gate_up_tile(x_ptr, w_ptr, expert, (ids // TOP_K).to(tl.int64), row_ok, offs_n, n_ok, H, I,
                            stride_xt, stride_we, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_FP32)
        out_ptrs = out_ptr + ids[:, None].to(tl.int64) * I + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_block(total_ptr, block_expert_ptr, sorted_ptr, weights_ptr, pid_m, N,
                    BLOCK_M: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
        """Block pid_m of a down GEMM, read around the PDL wait (which this runs, on every program):
        (live: the block is below the padded total, expert, assignment ids [BLOCK_M] (N = padding),
        their routing weights fp32).

        EARLY: read before the wait. The down GEMM's alignment and routing weights were written at
        least two launches back (align or router, then the gate/up GEMM): a PDL kernel lets the
        next one launch only after its own wait (kernels/pdl.py), so when this kernel's programs
        run, every kernel before the previous one has completed. The loads bypass L1 (.cg). The
        gate/up GEMM, which runs right after the alignment, must wait first."""
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if EARLY:
            total = tl.load(total_ptr, cache_modifier=".cg")
            expert = tl.load(block_expert_ptr + pid_m, cache_modifier=".cg")  # in bounds; unused past total
            # total is a multiple of BLOCK_M: a block's rows are all below it or none is
            ids = tl.load(sorted_ptr + offs, mask=offs < total, other=N, cache_modifier=".cg")
            wt = tl.load(weights_ptr + ids, mask=ids < N, other=0.0, cache_modifier=".cg")
            pdl_wait(PDL)
        else:
            pdl_wait(PDL)
            total = tl.load(total_ptr)
            expert = tl.load(block_expert_ptr + pid_m)
            ids = tl.load(sorted_ptr + offs, mask=offs < total, other=N)
            wt = tl.load(weights_ptr + ids, mask=ids < N, other=0.0)
        return pid_m * BLOCK_M < total, expert.to(tl.int64), ids, wt

    @triton.jit(do_not_specialize=["N", "num_pid_m"])
    def _down_kernel(
        a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
        N, H, I, num_pid_m, stride_we, stride_wn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr = False,
        EARLY: tl.constexpr = False,
    ):
        pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
        # the wait comes before the padded total's test, on every program (see _gate_up_kernel)
        live, expert, ids, wt = _down_block(total_ptr, block_expert_ptr, sorted_ptr, weights_ptr, pid_m, N,
                                            BLOCK_M, PDL, EARLY)
        if not live:
            return
        row_ok = ids < N
        rows = ids.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * I + offs_k[None, :]  # [BLOCK_M, BLOCK_K] of inter [N, I]
        b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(I, BLOCK_K)):
            k_ok = offs_k < I - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc *= wt[:, None]  # the routing weight
        out_ptrs = out_ptr + rows[:, None] * H + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# ---- launchers ----------------------------------------------------------------------------------

def triton_select_experts(
    logits: torch.Tensor,  # [T, E]
    cfg: RouterConfig,
    score_bias: torch.Tensor | None,  # [E] float32
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax, optional bias, top-k and renormalisation in one launch: (weights f32, ids int32),
    each [T, top_k + num_shared]; the last num_shared columns are the folded shared experts (ids
    E..E + num_shared - 1, weight 1; see MoEBlock)."""
    num_tokens, num_experts = logits.shape
    logits = logits.contiguous()
    out_k = cfg.top_k + num_shared
    weights = torch.empty(num_tokens, out_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, out_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(num_experts)
    # a few rows per program: the top-k loop is serial per row, so parallelism comes from programs
    block_t = max(1, min(triton.next_power_of_2(num_tokens), 256 // e_pad))
    bias = score_bias if score_bias is not None else weights  # unused pointer when HAS_BIAS is off
    _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, bias, weights, ids, num_tokens, num_experts, logits.stride(0), float(cfg.norm_min),
        TOP_K=cfg.top_k, K_PAD=triton.next_power_of_2(out_k), E_PAD=e_pad, BLOCK_T=block_t,
        HAS_BIAS=score_bias is not None, RENORM=cfg.renormalize, N_SHARED=num_shared,
        num_warps=1 if block_t * e_pad <= 256 else 4, **pdl_launch(pdl_enabled(logits.device)))
    return weights, ids


# Token counts up to this take `triton_route` (gate GEMV and routing in one launch); more take
# `logits()` then `triton_select_experts`. H100, 27 ERNIE-21B routers in a CUDA graph, us per router,
# old path -> triton_route: 1 token 9.7 -> 5.8, 2: 15.2 -> 6.4, 4: 16.0 -> 6.9, 8: 16.4 -> 8.4,
# 16: 15.4 -> 14.6. Past 16 the partials [splits, T, E] that one program adds outgrow the gain.
ROUTE_MAX_TOKENS = 16
# Programs of a routing launch: about two per SM of an H100 (132), each streaming a few KiB of the
# gate (the ERNIE-21B gate is 64 x 2560 fp32 = 640 KiB, which one program alone reads far too slowly).
# H100, 27 routers in a CUDA graph, ERNIE-21B: 256 programs of 4 experts beat 128 of 8 and 64 of 8
# by 1-3 us per router from 4 tokens up, and tie at one token.
_ROUTE_PROGRAMS = 256
# The counter of split_k.tile_counters the routing launch takes its tickets from: the last one, away
# from the low indices the split-K GEMMs and decode attention use. Kernels of one stream run one after
# another and each leaves its counters at zero, so this is only a margin, not a requirement.
_ROUTE_COUNTER = -1
# Token counts up to which MoEBlock routes and aligns in one launch (triton_route_align: the router's
# last program, which holds every id in registers, also writes moe_align's outputs, so the align
# launch goes: ~1.9 us per MoE layer of an H100 21B-A3B decode step, 27 layers, if the last program's
# extra work costs less). 0 = off, the default. NOT FOR USE YET: its first GPU run (H100, 883866a) hit an
# illegal memory access at 8 tokens (1 token passed); one token is served by STATIC_ALIGN_MAX_TOKENS
# below without any alignment work. ERNIESERVE_ROUTE_ALIGN_MAX_TOKENS
# overrides (read at each call, like the dense GEMV's switch); the slot cap below bounds it either way.
# To measure: the batch-1 decode step of docs/performance.md's `bench latency` command with
# ERNIESERVE_ROUTE_ALIGN_MAX_TOKENS=8 against 0, and the router's own time in a profile (its last
# program now does more, and every program of the launch is compiled for that branch's registers).
ROUTE_ALIGN_MAX_TOKENS = 0
# At most this many padded slots (T rounded up to a power of two, times next_pow2(top_k + shared))
# are aligned in the router: _align_rows compares every slot with every other, [64, 64] at most
# (21B-A3B: 8 tokens of 6 routed + 2 shared experts).
ROUTE_ALIGN_MAX_SLOTS = 64


@functools.cache  # asked by every MoE layer of every step: read the environment once
def route_align_max_tokens() -> int:
    return int(os.environ.get("ERNIESERVE_ROUTE_ALIGN_MAX_TOKENS", ROUTE_ALIGN_MAX_TOKENS))


# Token counts up to which MoEBlock gives the grouped GEMMs one block per assignment instead of
# sorting the assignments by expert (`per_assignment_alignment`): no align launch at all, and no
# routing work in the router's last program either. Exact at any count (each block computes its one
# assignment's row), but an expert picked by several tokens is then read once per token: meant for
# one token, whose top-k experts (and folded shared ones) are all distinct. H100, 21B-A3B batch-1
# decode (docs/performance.md): 3.078 -> 3.045 ms in bf16. ERNIESERVE_MOE_STATIC_ALIGN_MAX_TOKENS
# overrides (0 = off). Taken before the router-side alignment (ROUTE_ALIGN_MAX_TOKENS) where both apply.
STATIC_ALIGN_MAX_TOKENS = 1


@functools.cache
def static_align_max_tokens() -> int:
    return int(os.environ.get("ERNIESERVE_MOE_STATIC_ALIGN_MAX_TOKENS", STATIC_ALIGN_MAX_TOKENS))


# Whether the down GEMMs (bf16 and quantized) read their block's alignment, routing weights and
# (per-channel) weight scales before the PDL wait, while the gate/up GEMM still runs (`_down_block`).
# H100, 21B-A3B batch-1 decode with the one-block-per-assignment layout: 3.045 -> 3.015 ms in bf16;
# with both, wint4 1.900 -> 1.809 ms and wint8 2.368 -> 2.277 ms (docs/performance.md). On by default;
# ERNIESERVE_MOE_DOWN_EARLY=0 turns it off. It pays with PDL only; without it every earlier kernel has
# completed when the GEMM starts, and the order is moot.
DOWN_EARLY = True


@functools.cache
def down_early() -> bool:
    value = os.environ.get("ERNIESERVE_MOE_DOWN_EARLY")
    return DOWN_EARLY if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


# Whether the bf16 gate/up GEMM computes the folded shared experts' blocks before the PDL wait when
# the alignment is one block per assignment (`_gate_up_kernel`'s SHARED_SLOT0): they need neither
# the router's ids nor its weights, so they can run while the router does. H100, 21B-A3B batch-1
# decode (docs/performance.md, 0b7b432, two rounds): bf16 3.021 / 3.017 -> 2.914 / 2.914 ms. On by
# default; ERNIESERVE_MOE_SHARED_EARLY=0 turns it off.
SHARED_EARLY = True


@functools.cache
def shared_early() -> bool:
    value = os.environ.get("ERNIESERVE_MOE_SHARED_EARLY")
    return SHARED_EARLY if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


@functools.lru_cache(maxsize=64)
def _one_block_each(num_assignments: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [n * block_m]: assignment m at the head of block m, the rest padding (= n);
    padded total [1] = n * block_m), int32. Built with device ops, so also inside a graph capture."""
    n = num_assignments
    sorted_ids = torch.full((n, block_m), n, dtype=torch.int32, device=device)
    sorted_ids[:, 0] = torch.arange(n, dtype=torch.int32, device=device)
    total = torch.full((1,), n * block_m, dtype=torch.int32, device=device)
    return sorted_ids.view(-1), total


def per_assignment_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment | None:
    """An alignment of topk_ids [T, K] (int32, contiguous) with one block of block_m rows per
    assignment, in assignment order: block m holds assignment m alone, and its expert is simply
    topk_ids' m-th entry, so `block_expert` is a view of the router's output and the rest is
    static. The same capacity as moe_align's where T * K <= E (else None): the GEMMs' grids and
    checks do not change. Results equal the sorted layout's bit for bit (a row's sums do not depend
    on the other rows of its block)."""
    n = topk_ids.numel()
    if n == 0 or n > num_experts or topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
        return None
    sorted_ids, total = _one_block_each(n, block_m, topk_ids.device)
    return Alignment(sorted_ids, topk_ids.view(-1), total, block_m, per_assignment=True)


def route_align_supported(num_tokens: int, num_slots: int) -> bool:
    """Whether triton_route_align takes T tokens of num_slots (top_k + folded shared) ids each."""
    def pow2(n: int) -> int:
        return 1 << (n - 1).bit_length()

    if not 0 < num_tokens <= ROUTE_MAX_TOKENS:
        return False
    return pow2(num_tokens) * pow2(num_slots) <= ROUTE_ALIGN_MAX_SLOTS


@dataclass(frozen=True, slots=True)
class RouteTiles:
    block_t: int  # token rows, padded (next power of two of T)
    block_e: int  # experts per program
    splits: int  # hidden-dimension splits (a power of two: the combine loads them as one tensor axis)
    split_len: int  # hidden elements per split, a multiple of 16 (aligned, vectorised loads)
    block_h: int  # hidden elements per loop step; >= split_len at decode sizes, so one step
    reload: bool  # the summed logits go through the workspace before the top-k (see _route_kernel)
    num_warps: int


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.cache  # the same few shapes every MoE layer of every step: computed once each
def route_tiles(num_tokens: int, num_experts: int, hidden: int) -> RouteTiles:
    """The routing launch's grid: (ceil(E / block_e), splits), about _ROUTE_PROGRAMS programs.

    ERNIE-21B (E 64, H 2560): 16 expert blocks x 16 splits of 160, each program 2.5 KiB of the fp32
    gate in one loop step up to T 8 (two steps of 128 at T 16, where the [T, 4, step] product would
    not fit the registers). The combining program reads splits x T x E partials at once: capped at
    16 Ki floats (128 per thread)."""
    block_t = triton.next_power_of_2(max(1, num_tokens))
    e_pad = triton.next_power_of_2(num_experts)
    block_e = min(4, e_pad)
    splits = _pow2_floor(_ROUTE_PROGRAMS // triton.cdiv(num_experts, block_e))
    splits = min(splits, _pow2_floor(16384 // (block_t * e_pad)), _pow2_floor(triton.cdiv(hidden, 64)))
    split_len = triton.cdiv(triton.cdiv(hidden, splits), 16) * 16
    block_h = min(triton.next_power_of_2(split_len), max(16, 8192 // (block_t * block_e)))
    # measured on an H100 (27 routers in a CUDA graph, ERNIE-21B): the reload costs 1.4 us at 1 and
    # 2 tokens, saves 2.3 us at 4, 7 at 8 and 22 at 16; 8 warps were slower than 4 at every size
    return RouteTiles(block_t, block_e, splits, split_len, block_h, reload=block_t >= 4, num_warps=4)


def triton_route(
    x: torch.Tensor,  # [T, H], any float dtype (the model's)
    weight: torch.Tensor,  # [E, H], the gate as stored: fp32 (ERNIE) or the model dtype (Qwen3)
    cfg: RouterConfig,
    score_bias: torch.Tensor | None,  # [E] float32
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate GEMV and `triton_select_experts` in one launch, for T <= ROUTE_MAX_TOKENS: (weights
    f32, ids int32), each [T, top_k + num_shared], as triton_select_experts(logits(x), ...).

    Replaces x.float(), the cuBLAS GEMV (two kernels) and the routing kernel: four launches per MoE
    layer at decode, mostly fixed cost. The logits are float32 dot products of x and the gate, both
    converted in registers: ERNIE's reference (fp32 gate, x.float()) differs by summation order only;
    Qwen3's (a model-dtype linear) also by its rounding of the logits to the model dtype. Capturable:
    no host sync; the workspace's size depends on the shapes alone. With PDL (kernels/pdl.py) the
    gate is read before the wait for the previous kernel: it must be the stored weight."""
    weights, ids, _ = _route(x, weight, cfg, score_bias, num_shared, None)
    return weights, ids


def triton_route_align(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [E, H]
    cfg: RouterConfig,
    score_bias: torch.Tensor | None,  # [E] float32
    num_shared: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, Alignment]:
    """`triton_route`, whose last program also writes what `moe_align(ids, E + num_shared, block_m)`
    would (same buffers' sizes, same total, block_expert below it and sorted_ids[:total]): the
    weights, the ids and that alignment, from one launch instead of two. For
    T * next_pow2(top_k + num_shared) <= ROUTE_ALIGN_MAX_SLOTS only (route_align_supported);
    block_m must be the one the grouped GEMMs then run with (FusedMoE.align_block_m)."""
    weights, ids, alignment = _route(x, weight, cfg, score_bias, num_shared, block_m)
    assert alignment is not None
    return weights, ids, alignment


def _route(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig, score_bias: torch.Tensor | None,
           num_shared: int, align_block_m: int | None) -> tuple[torch.Tensor, torch.Tensor, Alignment | None]:
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if num_tokens > ROUTE_MAX_TOKENS:
        raise ValueError(f"triton_route takes at most {ROUTE_MAX_TOKENS} tokens, got {num_tokens}")
    assert weight.shape[1] == hidden
    out_k = cfg.top_k + num_shared
    weights = torch.empty(num_tokens, out_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_tokens, out_k, dtype=torch.int32, device=x.device)
    alignment = None
    if align_block_m is not None:
        if not route_align_supported(num_tokens, out_k):
            raise ValueError(f"triton_route_align aligns at most {ROUTE_ALIGN_MAX_SLOTS} padded slots, got "
                             f"{num_tokens} tokens of {out_k}")
        alignment = align_buffers(num_tokens * out_k, num_experts + num_shared, align_block_m, x.device)
    if num_tokens == 0:
        return weights, ids, alignment
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    t = route_tiles(num_tokens, num_experts, hidden)
    # the partial logits [splits, T, E], then one slot for the summed logits (RELOAD)
    ws = torch.empty((t.splits + 1) * num_tokens * num_experts, dtype=torch.float32, device=x.device)
    counter = split_k.tile_counters(x.device)[_ROUTE_COUNTER:]  # int32, as atomics need
    bias = score_bias if score_bias is not None else ws  # unused pointer when HAS_BIAS is off
    k_pad = triton.next_power_of_2(out_k)
    if alignment is None:
        align_args, align_kw = (ids, ids, ids), {}  # unused pointers (int32, as the aligned ones)
    else:
        align_args = (alignment.sorted_ids, alignment.block_expert, alignment.total)
        align_kw = dict(ALIGN=True, BLOCK_M=align_block_m,
                        EXPERT_BLOCKS=triton.next_power_of_2(triton.cdiv(t.block_t * k_pad, align_block_m)))
    _route_kernel[(triton.cdiv(num_experts, t.block_e), t.splits)](
        x, weight, bias, ws, counter, weights, ids, *align_args,
        num_tokens, num_experts, hidden, t.split_len, x.stride(0), weight.stride(0), float(cfg.norm_min),
        TOP_K=cfg.top_k, K_PAD=k_pad, E_PAD=triton.next_power_of_2(num_experts),
        BLOCK_T=t.block_t, BLOCK_E=t.block_e, BLOCK_H=t.block_h, SPLITS=t.splits, RELOAD=t.reload,
        HAS_BIAS=score_bias is not None, RENORM=cfg.renormalize, N_SHARED=num_shared, num_warps=t.num_warps,
        **align_kw, **pdl_launch(pdl_enabled(x.device)))
    return weights, ids, alignment


class Alignment(NamedTuple):
    """moe_align's outputs, and the block_m they were laid out for (the GEMMs must use the same)."""

    sorted_ids: torch.Tensor  # [cap] int32
    block_expert: torch.Tensor  # [cdiv(cap, block_m)] int32
    total: torch.Tensor  # [1] int32
    block_m: int
    per_assignment: bool = False  # per_assignment_alignment's layout: block m is assignment m alone


def align_buffers(num_assignments: int, num_experts: int, block_m: int, device: torch.device) -> Alignment:
    """Empty alignment outputs of moe_align's sizes (they depend on the shapes alone)."""
    cap = padded_capacity(num_assignments, num_experts, block_m)
    return Alignment(torch.empty(cap, dtype=torch.int32, device=device),
                     torch.empty(triton.cdiv(cap, block_m), dtype=torch.int32, device=device),
                     torch.empty(1, dtype=torch.int32, device=device), block_m)


def checked_alignment(alignment: Alignment | None, topk_ids: torch.Tensor, num_experts: int,
                      block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The given alignment (after checking it was made for this block_m and these sizes), or
    moe_align's of topk_ids."""
    if alignment is None:
        return moe_align(topk_ids.contiguous(), num_experts, block_m)
    cap = padded_capacity(topk_ids.numel(), num_experts, block_m)
    if alignment.block_m != block_m or alignment.sorted_ids.numel() != cap:
        raise ValueError(f"the alignment was made for block_m {alignment.block_m} and {alignment.sorted_ids.numel()} "
                         f"slots; the GEMMs run block_m {block_m} over {cap}")
    return alignment.sorted_ids, alignment.block_expert, alignment.total


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(sorted_ids [cap] int32, block_expert [cap // block_m] int32, padded total [1] int32)."""
    n = topk_ids.numel()
    dev = topk_ids.device
    sorted_ids, block_expert, total = align_buffers(n, num_experts, block_m, dev)[:3]
    _moe_align_kernel[(num_experts,)](
        topk_ids.reshape(-1), sorted_ids, block_expert, total, n, num_experts,
        BLOCK_M=block_m, NUM_BINS=triton.next_power_of_2(num_experts + 1), CHUNK=1024 if n > 256 else 256,
        **pdl_launch(pdl_enabled(dev)))
    return sorted_ids, block_expert, total


def fused_moe_triton(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    tiles: MoETileConfig | None = None,
    foreign_experts: bool = False,
    sum_slots: bool = True,
    alignment: Alignment | None = None,
    shared_slots: int = 0,
) -> torch.Tensor:  # [T, H], or [T, K, H] with sum_slots=False
    """foreign_experts: some ids equal E, experts held by another rank (expert parallelism); the
    align kernel leaves them out (the spare bin) and their output rows stay zero.
    sum_slots=False: the weighted per-slot outputs [T, K, H], for a consumer that adds them up
    itself (the next RMSNorm: layers/moe/layer.py), which saves the reduction's launch.
    alignment: moe_align's outputs for topk_ids already made (triton_route_align), for the tiles'
    block_m: the align launch is skipped.
    shared_slots: the last shared_slots columns of topk_ids are folded shared experts (the last
    expert ids, weight 1: MoEBlock); with a per-assignment alignment their gate/up blocks run before
    the router's ids are waited for (`_gate_up_kernel`'s SHARED_SLOT0, shared_early())."""
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    assert w13.is_contiguous() and w2.is_contiguous() and w13.shape[1] == 2 * inter
    x = x.contiguous()
    tiles = tiles or choose_tile_config(n, num_experts)
    bm = tiles.block_m
    sorted_ids, block_expert, total = checked_alignment(alignment, topk_ids, num_experts, bm)
    num_pid_m = block_expert.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # The interpreter (the only way these kernels run on CPU tensors) multiplies bf16 dot operands
    # as their raw bits; upcast there. On the GPU bf16 goes to the tensor cores as is.
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    pdl = pdl_launch(pdl_enabled(x.device))

    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)  # [N, I], assignment order
    t1 = fit_tile(tiles.gate_up, bm, 2, x.element_size())  # gate and up tiles
    early = {}
    if shared_slots and alignment is not None and alignment.per_assignment and shared_early():
        early = {"SHARED_SLOT0": top_k - shared_slots, "SHARED_EXPERT0": num_experts - shared_slots}
    _gate_up_kernel[(num_pid_m * triton.cdiv(inter, t1.block_n),)](
        x, w13, act, sorted_ids, block_expert, total, n, hidden, inter, num_pid_m,
        x.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=t1.block_n, BLOCK_K=t1.block_k, GROUP_M=tiles.group_m,
        DOT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=t1.num_warps, num_stages=t1.num_stages,
        **early, **pdl)

    alloc = torch.zeros if foreign_experts else torch.empty  # foreign rows are never written
    per_slot = alloc(n, hidden, dtype=x.dtype, device=x.device)  # [N, H], weighted
    t2 = fit_tile(tiles.down, bm, 1, x.element_size())
    _down_kernel[(num_pid_m * triton.cdiv(hidden, t2.block_n),)](
        act, w2, per_slot, topk_weights.float().contiguous(), sorted_ids, block_expert, total,
        n, hidden, inter, num_pid_m, w2.stride(0), w2.stride(1),
        BLOCK_M=bm, BLOCK_N=t2.block_n, BLOCK_K=t2.block_k, GROUP_M=tiles.group_m,
        DOT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=t2.num_warps, num_stages=t2.num_stages,
        EARLY=down_early(), **pdl)
    return combine_slots(per_slot, num_tokens, top_k, sum_slots)


def combine_slots(per_slot: torch.Tensor, num_tokens: int, top_k: int, sum_slots: bool) -> torch.Tensor:
    """[N, H] weighted per-assignment outputs -> their fixed-order sum per token [T, H], or the
    [T, K, H] view of them for a consumer that adds them up itself."""
    slots = per_slot.view(num_tokens, top_k, per_slot.shape[-1])
    return slots.sum(dim=1) if sum_slots else slots
