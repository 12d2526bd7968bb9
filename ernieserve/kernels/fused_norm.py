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

With a residual, x may also be [tokens, slots, hidden]: partial sums (a MoE layer's weighted expert
outputs, one per routed slot, see layers/moe/layer.py) that the kernel adds first, in fp32 and in
slot order, rounding once, as torch's ``x.sum(dim=1)`` does. That saves the MoE layer a reduction
launch per step; the slots are loaded side by side, so the sum costs the norm no extra latency.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernieserve.kernels.pdl import pdl_enabled, pdl_launch, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_cols, inv_n_cols, n_inner,
    stride_x_outer, stride_x_inner, stride_r_outer, stride_r_inner, stride_x_slot,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    in_dtype = x_ptr.dtype.element_ty
    if PDL:  # the norm weight is static: its load overlaps the previous kernel's tail
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    pdl_wait(PDL)  # x, the residual (and the outputs' stores) belong to earlier kernels

    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    if SLOTS > 1:  # partial sums to add first: fp32, in slot order, one rounding (torch's sum(dim=1))
        xs = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        for s in tl.static_range(1, SLOTS):
            xs += tl.load(x_row + s * stride_x_slot + cols, mask=mask, other=0.0).to(tl.float32)
        x = xs.to(in_dtype)
    else:
        x = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + outer * stride_r_outer + inner * stride_r_inner + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)  # [BLOCK]; masked lanes are 0 and add nothing to the sum
    # mean as sum * (1/n) with 1/n rounded once on the host, as torch's CUDA mean does
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=0) * inv_n_cols + eps)
    y = (xf * inv_rms).to(in_dtype)
    if not PDL:
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
    With a residual [tokens, hidden], x may be [tokens, slots, hidden]: partials summed first (the
    module docstring). weight: [hidden]. Outputs have the residual's shape (else x's) and are
    contiguous; `out` and `residual_out` may be preallocated by the caller (e.g. persistent buffers
    under a CUDA graph). With PDL (kernels/pdl.py) the weight is loaded before the wait for the
    previous kernel: it must be a weight, not something a kernel just wrote.
    """
    hidden = x.shape[-1]
    slots, stride_slot = 1, 0
    if residual is not None and x.dim() == 3 and residual.dim() == 2:
        assert x.shape[0] == residual.shape[0] and x.shape[2] == residual.shape[1], \
            f"slot partials {tuple(x.shape)} do not match the residual {tuple(residual.shape)}"
        if x.stride(-1) != 1:
            x = x.contiguous()
        slots, stride_slot = x.shape[1], x.stride(1)
        x = x[:, 0]  # rows addressed through slot 0; the kernel steps to the others
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
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(rows,)](
            xv, rv, weight, out, residual_out, hidden, 1.0 / hidden, n_inner, sxo, sxi, sro, sri, stride_slot, eps,
            HAS_RESIDUAL=residual is not None, SLOTS=slots, BLOCK=block, num_warps=_num_warps(block),
            enable_fp_fusion=False,  # products rounded on their own, as in torch
            **pdl_launch(pdl),
        )
    return out if residual is None else (out, residual_out)
