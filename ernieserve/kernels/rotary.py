"""Rotary position embedding for q and k in one Triton launch, in place.

The plain-torch reference is `ernieserve.layers.rotary.RotaryEmbedding` on CPU tensors. One
program serves one token: it reads that token's cos/sin row once and rotates all of its query
heads and key heads. Each rotation pairs element x1 with x2 of a head:

    neox (Llama, Qwen):   x1 = x[j],     x2 = x[j + D/2]     (rotate halves)
    interleaved (ERNIE):  x1 = x[2j],    x2 = x[2j + 1]      (rotate adjacent pairs)
    x1' = x1 cos_j - x2 sin_j,   x2' = x2 cos_j + x1 sin_j   for j in [0, D/2), in fp32

so the two layouts differ only in where x1 and x2 live. Neox loads the two contiguous halves;
interleaved loads whole head rows (contiguous, so the loads vectorise) and splits the pairs in
registers, instead of two stride-2 loads of single elements.
FMA contraction is turned off at launch so each product is rounded on its own as in torch's
separate elementwise kernels; results should then match torch's bit for bit on the GPU
(tests/gpu/test_fused_elementwise_gpu.py checks it).

In place is safe for the decoder: q and k are views of the fresh qkv projection output (their
columns do not overlap v's, nor each other's) or new tensors from the q/k norms, and nothing
reads the unrotated values afterwards. Strides of the token and head dims are free; the last
dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernieserve.kernels.pdl import pdl_enabled, pdl_launch, pdl_wait


@triton.jit
def _rotate_interleaved(x, c, s, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """x [BLOCK_H, 2 * BLOCK_HALF] fp32 whole head rows, pairs (2j, 2j + 1) -> rotated rows, fp32."""
    x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))
    return tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), [BLOCK_H, 2 * BLOCK_HALF])


@triton.jit
def _rotate_heads(
    x_ptr, stride_t, stride_h, token, num_heads, c, s,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    row = x_ptr + token * stride_t + heads * stride_h
    if INTERLEAVED:  # whole rows in and out (contiguous, vectorised), pairs split in registers
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (heads < num_heads) & (d < 2 * HALF)
        x = tl.load(row + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(row + d, _rotate_interleaved(x, c, s, BLOCK_H, BLOCK_HALF).to(x_ptr.dtype.element_ty), mask=mask)
    else:  # the two halves, each contiguous
        j = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
        mask = (heads < num_heads) & (j < HALF)
        x1 = tl.load(row + j, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + j + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(row + j, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(row + j + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_table, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """[1, BLOCK_HALF] fp32 cos and sin of this token's position (its table row)."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + pos * stride_table + j, mask=j < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_table + j, mask=j < HALF, other=0.0)[None, :]
    return c, s


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    INTERLEAVED: tl.constexpr, PDL: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    pdl_wait(PDL)  # positions, q and k come from earlier kernels (the table row depends on the position)
    c, s = _token_cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_table, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, c, s, BLOCK_HQ, BLOCK_HALF, HALF, INTERLEAVED)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_kv_heads, c, s, BLOCK_HK, BLOCK_HALF, HALF, INTERLEAVED)


def _check_heads(x: torch.Tensor, name: str, head_dim: int) -> None:
    assert x.dim() == 3 and x.shape[-1] == head_dim, f"{name} must be [num_tokens, heads, {head_dim}]"
    assert x.stride(-1) == 1, f"{name}'s head_dim must be contiguous to rotate it in place"


def apply_rotary_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by positions [T]; returns (q, k).

    cos, sin: [max_position, D // 2] float32 tables, rows contiguous.
    """
    head_dim = q.shape[-1]
    _check_heads(q, "q", head_dim)
    _check_heads(k, "k", head_dim)
    assert head_dim % 2 == 0 and cos.shape[-1] == head_dim // 2 and cos.stride() == sin.stride()
    assert cos.stride(-1) == 1 and positions.shape == (q.shape[0],) and k.shape[0] == q.shape[0]
    num_tokens, half = q.shape[0], head_dim // 2
    if num_tokens == 0:
        return q, k
    positions = positions.contiguous()  # a no-op for the runner's 1-D slices
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        # interleaved: x1 = x[2j], x2 = x[2j + 1]; neox: x1 = x[j], x2 = x[j + D/2]
        INTERLEAVED=interleaved, num_warps=4, enable_fp_fusion=False, **pdl_launch(pdl_enabled(q.device)),
    )
    return q, k


# --------------------------------------------------------------------------------------------
# Rotary + KV store in one launch (the Triton attention backend's path for 1-D positions)
# --------------------------------------------------------------------------------------------


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    num_q_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    stride_cb, stride_cs, stride_ch,
    CACHE_BLOCK: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    INTERLEAVED: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per token: rotate its query heads in place, and write its rotated key heads and
    its value heads straight into their cache slot (slot -1: padding, nothing stored). The key
    is rotated with the same fp32 operations as `_rotary_kernel`, so the cache holds the same bits."""
    token = tl.program_id(0).to(tl.int64)
    # positions, slots, q / k / v and the KV cache are earlier kernels' (or copies'): nothing static
    # to load first (the cos / sin row depends on the position)
    pdl_wait(PDL)
    c, s = _token_cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_table, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, c, s, BLOCK_HQ, BLOCK_HALF, HALF, INTERLEAVED)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        dst = (slot // CACHE_BLOCK) * stride_cb + (slot % CACHE_BLOCK) * stride_cs
        heads = tl.arange(0, BLOCK_HK)[:, None]
        k_row = k_ptr + token * stride_kt + heads * stride_kh
        cache_row = k_cache_ptr + dst + heads * stride_ch
        # round to k's dtype first, as rotating in place and then storing would
        if INTERLEAVED:
            d2 = tl.arange(0, 2 * BLOCK_HALF)[None, :]
            mask = (heads < num_kv_heads) & (d2 < 2 * HALF)
            x = tl.load(k_row + d2, mask=mask, other=0.0).to(tl.float32)
            out = _rotate_interleaved(x, c, s, BLOCK_HK, BLOCK_HALF).to(k_ptr.dtype.element_ty)
            tl.store(cache_row + d2, out.to(k_cache_ptr.dtype.element_ty), mask=mask)
        else:
            jj = tl.arange(0, BLOCK_HALF)[None, :]
            mask = (heads < num_kv_heads) & (jj < HALF)
            x1 = tl.load(k_row + jj, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(k_row + jj + HALF, mask=mask, other=0.0).to(tl.float32)
            out1 = (x1 * c - x2 * s).to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
            out2 = (x2 * c + x1 * s).to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
            tl.store(cache_row + jj, out1, mask=mask)
            tl.store(cache_row + jj + HALF, out2, mask=mask)
        d = tl.arange(0, BLOCK_D)[None, :]
        vmask = (heads < num_kv_heads) & (d < HEAD_DIM)
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + d, mask=vmask)
        tl.store(v_cache_ptr + dst + heads * stride_ch + d, v.to(v_cache_ptr.dtype.element_ty), mask=vmask)


def apply_rotary_and_store_kv_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q [T, Hq, D] in place; write rotated k [T, Hkv, D] and v into their cache slots.

    What `apply_rotary_` then `store_kv_triton` do, in one launch and without writing k back (the
    attention reads keys from the cache). k and v keep their values. Caches are
    [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64, -1 = do not store. Returns q.
    """
    head_dim = q.shape[-1]
    _check_heads(q, "q", head_dim)
    _check_heads(k, "k", head_dim)
    assert v.shape == k.shape and v.stride(-1) == 1
    assert head_dim % 2 == 0 and cos.shape[-1] == head_dim // 2 and cos.stride() == sin.stride()
    assert cos.stride(-1) == 1 and positions.shape == (q.shape[0],) and k.shape[0] == q.shape[0]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and slot_mapping.shape[0] >= q.shape[0]
    num_tokens, half = q.shape[0], head_dim // 2
    if num_tokens == 0:
        return q
    positions = positions.contiguous()
    _rotary_store_kernel[(num_tokens,)](
        q, k, v, positions, cos, sin, slot_mapping, k_cache, v_cache, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        CACHE_BLOCK=k_cache.shape[1], HALF=half, HEAD_DIM=head_dim, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        INTERLEAVED=interleaved, num_warps=4, enable_fp_fusion=False, **pdl_launch(pdl_enabled(q.device)),
    )
    return q
