"""Triton paged-attention kernels: KV store, unified (prefill / mixed) attention, split-K decode.

The plain-torch reference for every kernel here is `ernieserve.attention.torch_ref`
(`store_kv`, `paged_attention_ref`); tests/kernels/test_paged_attention.py checks one against the
other under TRITON_INTERPRET=1, tests/gpu/ at real shapes.

Cache layout (see attention/base.py): k_cache, v_cache are each
``[num_blocks, block_size, num_kv_heads, head_dim]``; key t of request i lives at block
``block_tables[i, t // block_size]``, offset ``t % block_size``.

GQA: one program serves all query heads that share a KV head, so every K/V tile is read once per
KV head rather than once per query head. The rows of a program's query tile are
(token, head-in-group) pairs, ``row = token * GROUP_PAD + head``, which turns GQA into a plain
[BLOCK_M, head_dim] x [head_dim, BLOCK_N] matmul.

Nothing here reads a device value on the host, and the decode path allocates nothing when the
caller hands in its scratch buffers, so the decode path can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ernieserve.kernels import split_k
from ernieserve.kernels.pdl import pdl_enabled, pdl_launch, pdl_wait

# exp(x) = exp2(x * log2(e)); the kernels fold log2(e) into the softmax scale and work in base 2.
_LOG2_E = 1.4426950408889634

# Split-K policy for decode (see choose_num_splits).
MIN_KEYS_PER_SPLIT = 128  # below this a split's fixed cost (Q load, partial write) dominates
MAX_DECODE_SPLITS = 64
_WAVES_TARGET = 2  # aim for about this many programs per SM


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 matmuls (the oracle is fp32); half types use tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_in_fp32(query: torch.Tensor) -> bool:
    # The Triton interpreter (the only way these kernels run on CPU tensors) multiplies bf16 dot
    # operands as their raw uint16 bits; upcast there. On GPU, bf16 goes to the tensor cores as is.
    return query.device.type == "cpu" and query.dtype == torch.bfloat16


def _group_pad(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads not a multiple of {num_kv_heads} KV heads"
    group = num_heads // num_kv_heads
    return group, triton.next_power_of_2(group)


# --------------------------------------------------------------------------------------------
# KV store
# --------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,  # cache strides: block, slot-in-block, kv head (dim stride 1)
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token row: copies its [num_kv_heads, head_dim] K and V into one cache slot.
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:  # padding row
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    src_k = key_ptr + tok.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = value_ptr + tok.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write every K/V row of the step into its cache slot in one launch (rows with slot -1 skipped)."""
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "key/value rows must be contiguous in head_dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


# --------------------------------------------------------------------------------------------
# Unified attention: any number of new tokens per request (prefill, chunked prefill, mixed)
# --------------------------------------------------------------------------------------------


@triton.jit
def _find_request(qsl_ptr, tile, num_reqs, BLOCK_Q: tl.constexpr):
    # Request r owns the query tiles [start(r), start(r+1)) with start(r) = qsl[r] // BLOCK_Q + r:
    # the "+ r" leaves room for each request's partial last tile. start() is strictly increasing,
    # so the owner of `tile` is the last r with start(r) <= tile; binary search for it.
    lo = tile * 0  # tensors from the start: num_reqs == 1 arrives as a constexpr
    hi = lo + num_reqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        is_le = mid_start <= tile
        lo = tl.where(is_le, mid, lo)
        hi = tl.where(is_le, hi, mid)
    return lo


@triton.jit
def _attend_kv_tile(
    q, acc, m_i, l_i,  # q [M, BLOCK_D]; acc [M, BLOCK_D] fp32; m_i, l_i [M] fp32 (base-2 running max / sum)
    n0, kv_end, q_pos,  # first key of the tile; keys >= kv_end are out; q_pos [M]: row r sees keys <= q_pos[r]
    k_cache_ptr, v_cache_ptr, bt_row, kv_head_off, qk_scale,
    stride_cb, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [n0, n0 + BLOCK_N). MASKED=False is for tiles that every
    row sees whole (strictly below the causal diagonal and the end of the context): no masks."""
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < kv_end
    d_ok = offs_d < HEAD_DIM
    if MASKED:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE)
    # [BLOCK_N] offset of each key's row in the cache: block ids gathered per key, so a tile may
    # span several cache blocks (BLOCK_N > block_size) or part of one
    kv_off = blk.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_head_off
    k_ptrs = k_cache_ptr + kv_off[None, :] + offs_d[:, None]  # [BLOCK_D, BLOCK_N]: K^T for the dot
    v_ptrs = v_cache_ptr + kv_off[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return _attend_tile_values(q, acc, m_i, l_i, k, v, offs_n, n_ok, q_pos, qk_scale, MASKED, DOT_PRECISION)


@triton.jit
def _attend_tile_values(
    q, acc, m_i, l_i, k, v,  # k [BLOCK_D, BLOCK_N] (K^T), v [BLOCK_N, BLOCK_D], already loaded
    offs_n, n_ok, q_pos, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The online-softmax step of `_attend_kv_tile` on a loaded tile."""
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale  # [M, BLOCK_N]
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Counts that change from step to step are not specialised: Triton would otherwise compile
# a variant for each of their classes (1, a multiple of 16, other) at first use, mid-serving.
@triton.jit(do_not_specialize=["num_reqs"])
def _unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, block_tables_ptr,
    num_reqs, qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    req = _find_request(qsl_ptr, tile, num_reqs, BLOCK_Q)
    q_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_begin
    q0 = (tile - (q_begin // BLOCK_Q + req)) * BLOCK_Q  # first new token of this tile, within the request
    if q0 >= q_len:  # spare tile (request ended early in its tile range, or empty request)
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # tokens cached before this step; new token j sits at ctx_len + j

    # rows = (token, head-in-group) pairs: [BLOCK_M] with BLOCK_M = BLOCK_Q * GROUP_PAD
    offs_m = tl.arange(0, BLOCK_M)
    tok = q0 + offs_m // GROUP_PAD  # [BLOCK_M] token index within the request
    head = kvh * GROUP + offs_m % GROUP_PAD  # [BLOCK_M] query head
    row_ok = (tok < q_len) & (offs_m % GROUP_PAD < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = ctx_len + tok  # [BLOCK_M] absolute position of each row's token

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (finite: padded rows stay NaN-free)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys beyond the tile's last token are invisible to every row; keys up to its first token's
    # position are visible to every row, so whole tiles below that need no mask
    kv_end = ctx_len + tl.minimum(q0 + BLOCK_Q, q_len)
    full_end = (ctx_len + q0 + 1) // BLOCK_N * BLOCK_N
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_head_off = kvh * stride_ch
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            q, acc, m_i, l_i, n0, kv_end, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head_off, qk_scale,
            stride_cb, stride_cs, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, False, DOT_PRECISION,
        )
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            q, acc, m_i, l_i, n0, kv_end, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head_off, qk_scale,
            stride_cb, stride_cs, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, DOT_PRECISION,
        )

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )


def paged_attention_unified(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, context length including this step's tokens
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its whole (already stored) context.

    Grid: (query tiles, kv heads). The tile count is an upper bound known on the host,
    ``num_tokens // BLOCK_Q + num_reqs``; each program finds its request by binary search over
    query_start_loc, and spare tiles exit at once. Rows of `out` that belong to no request are
    left untouched.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_reqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    group, group_pad = _group_pad(num_heads, num_kv_heads)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # defaults tuned on H100 for the ERNIE-0.3B layout (GQA 8, head_dim 128): about 60% of
    # FlashAttention-2's dense causal speed on 2k-8k prefills
    block_m = max(block_m or 64, group_pad, 16)
    block_n = block_n or 64
    block_q = block_m // group_pad
    assert query.stride(-1) == 1 and out.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride()
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _unified_attention_kernel[grid](
        query, k_cache, v_cache, out,
        query_start_loc, seq_lens, block_tables,
        num_reqs, scale * _LOG2_E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(query.dtype), DOT_FP32=_dot_in_fp32(query),
        num_warps=8 if block_m * block_d > 64 * 128 else 4, num_stages=2,
    )
    return out


# --------------------------------------------------------------------------------------------
# Decode: one new token per request, context split across programs (flash-decoding)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    seq_lens_ptr, block_tables_ptr,
    num_splits, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    stride_pr, stride_ph, stride_ps,  # part_out [num_reqs, num_heads, num_splits, head_dim]
    stride_lr, stride_lh,  # part_lse [num_reqs, num_heads, num_splits] (split stride 1)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
):
    # Decode-only steps: request r's single new token is query row r.
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # q and this step's K/V (written by the projection's or the rotary + store kernel) are the
    # previous kernel's, and so are the split counters (the previous split-K kernel puts its
    # counters back to zero at its very end): after the wait, on every program. EARLY (the latency
    # tiles, decode_tiles): seq_lens and block tables (this step's uploaded inputs, copied before its
    # first kernel) and the keys and values earlier steps wrote are read before it: everything but
    # the previous kernel has completed when this kernel's programs run (kernels/pdl.py: a kernel
    # lets the next one launch only after its own wait). A decode-only step writes one key per
    # request, at seq_len - 1. Without EARLY: everything after the wait.
    if not EARLY:
        pdl_wait(PDL)
    seq_len = tl.load(seq_lens_ptr + req)  # the new token sees all seq_len keys, itself included
    # each request cuts its own context into BLOCK_N-aligned ranges of split_len keys; only the
    # first `used` splits hold keys (a CUDA graph fixes num_splits for the longest context, most
    # steps' contexts are shorter): the others do nothing, and one used split writes the output
    # itself. Split 0 always runs, so a padded request (seq_len 0) gets a zero row.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    used = tl.maximum(tl.cdiv(seq_len, split_len), 1)
    n_begin = split * split_len
    n_end = tl.minimum(n_begin + split_len, seq_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row = req.to(tl.int64)
    bt_row = block_tables_ptr + row * stride_bt
    kv_head_off = kvh * stride_ch
    if EARLY:
        # the split's first tile, but for the newest key: loaded before the wait, that one after it
        offs_n0 = n_begin + tl.arange(0, BLOCK_N)
        n_ok0 = offs_n0 < n_end  # none in an unused split (n_begin >= seq_len)
        blk0 = tl.load(bt_row + offs_n0 // BLOCK_SIZE, mask=n_ok0, other=0)
        kv_off0 = blk0.to(tl.int64) * stride_cb + (offs_n0 % BLOCK_SIZE) * stride_cs + kv_head_off
        k_ptrs0 = k_cache_ptr + kv_off0[None, :] + offs_d[:, None]  # [BLOCK_D, BLOCK_N]: K^T
        v_ptrs0 = v_cache_ptr + kv_off0[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        old = n_ok0 & (offs_n0 < seq_len - 1)  # written by earlier steps
        k0 = tl.load(k_ptrs0, mask=old[None, :] & d_ok[:, None], other=0.0)
        v0 = tl.load(v_ptrs0, mask=old[:, None] & d_ok[None, :], other=0.0)
        pdl_wait(PDL)
        new = n_ok0 & (offs_n0 == seq_len - 1)  # this step's key and value
        k0 = tl.where(new[None, :], tl.load(k_ptrs0, mask=new[None, :] & d_ok[:, None], other=0.0), k0)
        v0 = tl.where(new[:, None], tl.load(v_ptrs0, mask=new[:, None] & d_ok[None, :], other=0.0), v0)
    if split < used:
        offs_g = tl.arange(0, GROUP_PAD)  # [GROUP_PAD] rows: query heads of this kv head (padded for tl.dot)
        head = kvh * GROUP + offs_g
        g_ok = offs_g < GROUP
        mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + row * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=mask,
                    other=0.0)  # [GROUP_PAD, BLOCK_D]
        if DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
        # every key of the split is visible to the new token: only the split's ragged last tile is masked
        q_pos = tl.full([GROUP_PAD], 0, tl.int32) + (seq_len - 1)
        full_end = n_begin + tl.maximum(n_end - n_begin, 0) // BLOCK_N * BLOCK_N
        first = n_begin
        if EARLY:  # the first tile, loaded above (masked: the same values as an unmasked full tile)
            acc, m_i, l_i = _attend_tile_values(q, acc, m_i, l_i, k0, v0, offs_n0, n_ok0, q_pos, qk_scale,
                                                True, DOT_PRECISION)
            first = n_begin + BLOCK_N
        for n0 in range(first, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_kv_tile(
                q, acc, m_i, l_i, n0, n_end, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head_off, qk_scale,
                stride_cb, stride_cs, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, False, DOT_PRECISION,
            )
        for n0 in range(tl.maximum(full_end, first), n_end, BLOCK_N):
            acc, m_i, l_i = _attend_kv_tile(
                q, acc, m_i, l_i, n0, n_end, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head_off, qk_scale,
                stride_cb, stride_cs, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, DOT_PRECISION,
            )

        has_keys = l_i > 0.0  # False for a padded request (seq_len 0)
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + row * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        if used == 1:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            part_base = part_out_ptr + row * stride_pr + head[:, None] * stride_ph + offs_d[None, :]
            lse_base = part_lse_ptr + row * stride_lr + head * stride_lh
            tl.store(part_base + split * stride_ps, out, mask=mask)
            lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))  # base 2
            tl.store(lse_base + split, lse, mask=g_ok)
            # the last used split of this (request, kv head) to finish combines them (kernels/split_k.py
            # has the ticket scheme): weights exp2(lse_s - max lse), normalised; no second launch
            tl.debug_barrier()  # every thread's partial is written before one thread takes the ticket
            ticket = tl.atomic_add(counter_ptr + req * tl.num_programs(1) + kvh, 1, sem="acq_rel")
            if ticket == used - 1:
                # all splits' lse in one load, the partials four splits at a time: a load per split
                # in a loop waits out one L2 round trip each (64 splits cost 36 µs that way)
                offs_s = tl.arange(0, SPLIT_PAD)
                lse_all = tl.load(lse_base[:, None] + offs_s[None, :], mask=g_ok[:, None] & (offs_s < used)[None, :],
                                  other=float("-inf"), cache_modifier=".cg")  # [GROUP_PAD, SPLIT_PAD]
                lse_max = tl.max(lse_all, axis=1)
                lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: zeros
                w_sum = tl.sum(tl.exp2(lse_all - lse_max[:, None]), axis=1)
                total = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
                for s0 in range(0, used, 4):
                    for i in tl.static_range(4):
                        row_ok = g_ok & (tl.full([GROUP_PAD], s0 + i, tl.int32) < used)
                        lse_s = tl.load(lse_base + s0 + i, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                        part = tl.load(part_base + (s0 + i) * stride_ps, mask=row_ok[:, None] & d_ok[None, :],
                                       other=0.0, cache_modifier=".cg")
                        total += tl.exp2(lse_s - lse_max)[:, None] * part
                final = total / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
                tl.store(out_ptrs, final.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter_ptr + req * tl.num_programs(1) + kvh, 0)


@dataclass(frozen=True)
class DecodeTiles:
    """The split-K decode kernel's launch choices (`decode_tiles` picks them)."""

    block_n: int = 128  # keys per tile
    warps: int = 4
    stages: int = 3  # the tile loop's software pipelining (loads staged through shared memory)
    early: bool = False  # EARLY: the first tile of earlier steps' keys read before the PDL wait
    min_keys: int = MIN_KEYS_PER_SPLIT  # fewest keys per split in choose_num_splits


# At most this many (request, KV head) pairs, decode attention is a latency chain, not a read: each
# program reads its first 64 keys of earlier steps before the PDL wait (while the qkv projection still
# runs), without staging through shared memory. Measured on an H100 (docs/performance.md, session of
# 2026-11-23 04:47): 21B-A3B batch-1 decode, these tiles against the throughput ones in one command,
# bf16 2.913 -> 2.841 ms, wint4 1.498 -> 1.379 ms; one layer's attention in a graph (21B layout),
# batch 1: 6.6 -> 4.7 us at 190 keys, 16.6 -> 13.7 at 8192; batch 16 at 8192: 110.6 -> 103.0. Batch
# 64 (256 pairs) at 8192 keys: 387 -> 435 us, so larger batches keep 128-key tiles in three stages.
LATENCY_PAIRS = 64
DECODE_TILES_ENV = "ERNIESERVE_DECODE_ATTN"
# the policy's tiles by head size (past head_dim 128 twice the registers per key: half the keys)
_LATENCY_TILES = {False: DecodeTiles(block_n=64, stages=1, early=True),
                  True: DecodeTiles(block_n=32, stages=1, early=True)}
_THROUGHPUT_TILES = {False: DecodeTiles(block_n=128), True: DecodeTiles(block_n=64)}


def decode_tiles(num_reqs: int, num_kv_heads: int, head_dim: int) -> DecodeTiles:
    """The tiles for a decode launch: ERNIESERVE_DECODE_ATTN's when set (every launch), else the
    latency tiles up to LATENCY_PAIRS (request, KV head) pairs, else the throughput tiles."""
    forced = env_decode_tiles()
    if forced is not None:
        return forced
    latency = _batch_class(num_reqs) * num_kv_heads <= LATENCY_PAIRS
    return (_LATENCY_TILES if latency else _THROUGHPUT_TILES)[head_dim > 128]


def _batch_class(num_reqs: int) -> int:
    """The request count the decode policies see: rounded up to a power of two, so a CUDA graph's
    padded batch (the capture sizes hold every power of two up to the largest) and the same requests
    run eagerly get the same splits and tiles, hence the same bits."""
    return triton.next_power_of_2(max(1, num_reqs))


@functools.cache
def env_decode_tiles() -> DecodeTiles | None:
    """ERNIESERVE_DECODE_ATTN="block_n=32,warps=4,stages=1,early=1,min_keys=32" (any subset, the rest
    DecodeTiles' defaults; read once per process): one set of tiles for every decode launch, for
    experiments. None when unset."""
    spec = os.environ.get(DECODE_TILES_ENV, "").strip()
    if not spec:
        return None
    fields = [f.name for f in dataclasses.fields(DecodeTiles)]
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if name not in fields or not raw:
            raise ValueError(f"{DECODE_TILES_ENV}: '{item}' is not one of {', '.join(n + '=VALUE' for n in fields)}")
        values[name] = raw.lower() in ("1", "true", "yes", "on") if name == "early" else int(raw)
    return DecodeTiles(**values)


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Host-side split-K policy, from values the runner already holds (no device read).

    Split only when (reqs x kv heads) programs would leave SMs idle, never below
    MIN_KEYS_PER_SPLIT keys per split; a power of two so few kernel variants compile.
    """
    forced = env_decode_tiles()
    by_len = max(1, max_seq_len // (forced.min_keys if forced is not None else MIN_KEYS_PER_SPLIT))
    by_occupancy = triton.cdiv(_WAVES_TARGET * num_sms, _batch_class(num_reqs) * num_kv_heads)
    splits = max(1, min(by_len, by_occupancy, MAX_DECODE_SPLITS))
    return 1 << (splits.bit_length() - 1)  # round down to a power of two


def decode_scratch_rows(max_num_reqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Upper bound of num_reqs * num_splits over every batch size up to max_num_reqs."""
    return max(b * choose_num_splits(b, num_kv_heads, 1 << 30, num_sms) for b in range(1, max_num_reqs + 1))


def paged_attention_decode(
    query: torch.Tensor,  # [num_reqs(+pad), num_heads, head_dim], one token per request
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [num_reqs] int32; 0 for a padded request (its output row is zeros)
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    scratch: torch.Tensor | None = None,  # flat fp32, >= num_reqs * num_heads * num_splits * (head_dim + 1)
    block_n: int | None = None,  # keys per tile, overriding the tiles' (tests)
    tiles: DecodeTiles | None = None,  # None: decode_tiles()
) -> torch.Tensor:
    """Split-K decode attention. Grid (num_reqs, num_kv_heads, num_splits); each request uses as
    many of the splits as its context fills, and the last of them to finish combines them by
    log-sum-exp in the same launch. A request whose context fits one split (always, with
    num_splits == 1) is written directly. Capturable: with `out` and `scratch`
    given it allocates nothing (the split counters are allocated once per device).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_reqs = seq_lens.shape[0]
    assert num_reqs <= num_tokens
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_reqs == 0:
        return out
    group, group_pad = _group_pad(num_heads, num_kv_heads)
    tiles = decode_tiles(num_reqs, num_kv_heads, head_dim) if tiles is None else tiles
    group_pad = max(group_pad, 16)  # tl.dot needs M >= 16
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = block_n or tiles.block_n
    assert query.stride(-1) == 1 and out.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride()

    # int32 tile counters (kernels/split_k.py); the kernel's combine branch is compiled whatever the
    # split count, so every pointer keeps its type: one variant for all steps
    counters = split_k.tile_counters(query.device)
    if num_splits > 1:
        need = num_reqs * num_heads * num_splits * (head_dim + 1)
        if scratch is None:
            scratch = torch.empty(need, dtype=torch.float32, device=query.device)
        assert scratch.dtype == torch.float32 and scratch.numel() >= need, "decode scratch too small"
        n_out = num_reqs * num_heads * num_splits * head_dim
        part_out = scratch[:n_out].view(num_reqs, num_heads, num_splits, head_dim)
        part_lse = scratch[n_out:need].view(num_reqs, num_heads, num_splits)
        p_strides, l_strides = part_out.stride()[:3], part_lse.stride()[:2]
    else:  # every request fits its one split and writes `out` directly: fp32 stand-ins, never read
        part_out = part_lse = counters.view(torch.float32)
        p_strides, l_strides = (0, 0, 0), (0, 0)

    assert num_reqs * num_kv_heads <= split_k.MAX_TILES and 1 <= num_splits <= MAX_DECODE_SPLITS
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, out, part_out, part_lse, counters,
        seq_lens, block_tables,
        num_splits, scale * _LOG2_E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *p_strides, *l_strides,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, BLOCK_D=block_d, SPLIT_PAD=triton.next_power_of_2(MAX_DECODE_SPLITS),
        DOT_PRECISION=_dot_precision(query.dtype), DOT_FP32=_dot_in_fp32(query),
        EARLY=tiles.early, num_warps=tiles.warps, num_stages=tiles.stages,
        **pdl_launch(pdl_enabled(query.device)),
    )
    return out
