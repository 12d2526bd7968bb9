"""Fused (residual add +) RMSNorm in one Triton kernel: one program per row.

The plain-torch reference is `ernieserve.layers.norm.RMSNorm` on CPU tensors; the kernel repeats
its numerics step by step so bf16 results match torch's to the bit in almost every element:

    s   = to_dtype(f32(x) + f32(residual))          # torch adds half types in fp32, rounds once
    y   = to_dtype(f32(s) * rsqrt(mean(f32(s)^2) + eps))   # HF: cast back BEFORE the weight
    out = to_out_dtype(f32(weight) * f32(y))

Only the order of the fp32 sum of squares differs from torch's (a tree here, torch's own
reduction there), which moves rsqrt's input by an ulp or so of fp32 and the bf16 output rarely.

Rows are addressed as (outer, inner) pairs with two strides, so both a [tokens, hidden] matrix
and a strided [tokens, heads, head_dim] view of the fused qkv output (Qwen3's per-head q/k norm)
are read in place, without a copy. Outputs are new contiguous tensors (or the caller's `out`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_cols, inv_n_cols, n_inner,
    stride_x_outer, stride_x_inner, stride_r_outer, stride_r_inner,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    in_dtype = x_ptr.dtype.element_ty

    x = tl.load(x_ptr + outer * stride_x_outer + inner * stride_x_inner + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + outer * stride_r_outer + inner * stride_r_inner + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)  # [BLOCK]; masked lanes are 0 and add nothing to the sum
    # mean as sum * (1/n) with 1/n rounded once on the host, as torch's CUDA mean does
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=0) * inv_n_cols + eps)
    y = (xf * inv_rms).to(in_dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """A 3-D view [outer, inner, cols] of x (a copy only if no such view exists), plus
    (num_rows, n_inner, stride_outer, stride_inner)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        x = x.unsqueeze(1)  # [rows, 1, cols]
    elif x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x, x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def _num_warps(block: int) -> int:
    # about 8 elements per thread (16 bytes of bf16), between 1 and 16 warps
    return max(1, min(16, block // 256))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * weight, or with a residual (norm(x + residual) * weight, x + residual).

    x, residual: [..., hidden] (same shape and dtype; the last dim contiguous, other strides free).
    weight: [hidden]. Outputs have x's shape and are contiguous; `out` and `residual_out` may be
    preallocated by the caller (e.g. persistent buffers under a CUDA graph).
    """
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous(), "weight must be a contiguous [hidden]"
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # what `weight * y` gives in torch
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == out_dtype
    xv, rows, n_inner, sxo, sxi = _as_rows(x)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        assert residual_out.is_contiguous() and residual_out.shape == x.shape and residual_out.dtype == x.dtype
        rv, _, _, sro, sri = _as_rows(residual)
    else:
        rv, sro, sri, residual_out = xv, 0, 0, out  # unused: HAS_RESIDUAL prunes the branch
    if rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            xv, rv, weight, out, residual_out, hidden, 1.0 / hidden, n_inner, sxo, sxi, sro, sri, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
            enable_fp_fusion=False,  # products rounded on their own, as in torch
        )
    return out if residual is None else (out, residual_out)
