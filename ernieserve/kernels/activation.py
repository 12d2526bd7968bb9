"""silu(gate) * up over the fused gate_up projection output, in one Triton kernel.

The plain-torch reference is `ernieserve.layers.activation.SiluAndMul` on CPU tensors; the kernel
keeps its rounding steps: torch (and HF's `act_fn(gate) * up`) rounds silu's result to the input
dtype before the multiply, so the kernel does too:

    out = to_dtype(f32(to_dtype(silu(f32(gate)))) * f32(up))

On the GPU silu uses libdevice's expf and an IEEE division, the same operations torch's CUDA
silu compiles to, so results should match torch's bit for bit there. The Triton interpreter has
no libdevice; it uses tl.exp (numpy's exp), a few fp32 ulps away at most.

Grid: (rows, column tiles); each program reads BLOCK gate and BLOCK up elements of one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ernieserve.kernels.pdl import pdl_enabled, pdl_launch, pdl_wait

BLOCK = 1024  # columns per program: 2 KiB of bf16 per operand, 8 per thread with 4 warps


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x_row, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
                         PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    pdl_wait(PDL)  # x is the previous GEMM's output: nothing static to load first
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    if LIBDEVICE_EXP:
        denom = 1.0 + libdevice.exp(-gate)
    else:
        denom = 1.0 + tl.exp(-gate)
    act = tl.math.div_rn(gate, denom).to(dtype)
    tl.store(out_ptr + row * d + cols, (act.to(tl.float32) * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., 2d] -> [..., d] (contiguous; `out` may be preallocated by the caller)."""
    d = x.shape[-1] // 2
    assert x.shape[-1] == 2 * d, "the last dim must hold gate and up halves"
    rows2d = x.reshape(-1, 2 * d) if x.stride(-1) == 1 else x.contiguous().reshape(-1, 2 * d)
    if out is None:
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    assert out.is_contiguous() and out.shape == (*x.shape[:-1], d) and out.dtype == x.dtype
    num_rows = rows2d.shape[0]
    if num_rows > 0 and d > 0:
        grid = (num_rows, triton.cdiv(d, BLOCK))
        _silu_and_mul_kernel[grid](rows2d, out, d, rows2d.stride(0), BLOCK=BLOCK,
                                   LIBDEVICE_EXP=x.is_cuda, num_warps=4, enable_fp_fusion=False,
                                   **pdl_launch(pdl_enabled(x.device)))
    return out
