"""FP8 (e4m3) W8A8 GEMMs with dynamic activation scales: block-wise (FastDeploy's
`block_wise_fp8`, DeepSeek-V3 style) and per-channel (vLLM's online `fp8`).

Scales (``value = fp8 * scale``, all fp32, symmetric, ``scale = amax / 448``):

* block-wise: weight ``[N, K]`` with one scale per 128 x 128 block, ``w_scale [ceil(N/128),
  ceil(K/128)]``; activations one scale per token and 128 columns, ``x_scale [M, ceil(K/128)]``,
  computed on the fly by `quant_fp8_per_token_group`.
* per-channel: ``w_scale [N, 1]`` per output channel, ``x_scale [M, 1]`` per token.

`_fp8_gemm_kernel`: grid (M tiles, N tiles, K splits) like the weight-only kernel. A block-wise
step (BLOCK_K divides 128) multiplies its fp32 partial product by ``x_scale[m, k // 128] *
w_scale[n // 128, k // 128]``; per-channel multiplies the accumulator once at the end. The
references dequantize to fp32 and matmul (`fp8_matmul_ref`, `quant_fp8_per_token_group_ref`).
`torch._scaled_mm` (row-wise scales, Hopper, bf16 out) is the built-in alternative for
per-channel. These GEMMs run only on Hopper (sm90+) in serving; the interpreter runs them on CPU
for tests.
"""

from __future__ import annotations

import torch

from ernieserve.kernels import split_k
from ernieserve.kernels.pdl import pdl_enabled, pdl_launch
from ernieserve.kernels.quant_matmul import HAS_TRITON, GemmTiles, choose_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ernieserve.kernels.pdl import pdl_wait
    from ernieserve.kernels.split_k import store_tile

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BLOCK = 128  # block-wise: weight blocks are SCALE_BLOCK x SCALE_BLOCK, activation groups 1 x SCALE_BLOCK
_EPS = 1e-10


# ---- quantization (plain torch) -------------------------------------------------------------------

def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def quantize_fp8_blockwise(w: torch.Tensor, block: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q e4m3 [N, K], scales fp32 [ceil(N/block), ceil(K/block)])."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    blocks = _pad_to(w.float(), nb * block, kb * block).view(nb, block, kb, block)
    scales = blocks.abs().amax(dim=(1, 3)).clamp_min(_EPS) / FP8_MAX  # [nb, kb]
    q = (blocks / scales[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scales


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q e4m3 [N, K], scales fp32 [N, 1])."""
    wf = w.float()
    scales = wf.abs().amax(dim=1, keepdim=True).clamp_min(_EPS) / FP8_MAX
    return (wf / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def quant_fp8_per_token_group_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q e4m3 [M, K], scales fp32 [M, ceil(K/group)]); group 0 = one per token."""
    m, k = x.shape
    g = k if group == 0 else group
    ng = -(-k // g)
    xg = _pad_to(x.float(), m, ng * g).view(m, ng, g)
    scales = xg.abs().amax(dim=-1).clamp_min(_EPS) / FP8_MAX  # [M, ng]
    q = (xg / scales[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, ng * g)[:, :k].contiguous(), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, row_block: int, col_block: int) -> torch.Tensor:
    """fp8 [R, C] with scales [ceil(R/row_block), ceil(C/col_block)] -> fp32 [R, C]."""
    r, c = q.shape
    expanded = scales.repeat_interleave(row_block, 0)[:r].repeat_interleave(col_block, 1)[:, :c]
    return q.float() * expanded


def fp8_matmul_ref(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   block_wise: bool, out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] fp8 x [N, K] fp8 -> [M, N] out_dtype, in fp32 after dequantizing both."""
    k = xq.shape[1]
    if block_wise:
        x = dequantize_fp8(xq, x_scale, 1, SCALE_BLOCK)
        w = dequantize_fp8(wq, w_scale, SCALE_BLOCK, SCALE_BLOCK)
    else:
        x = dequantize_fp8(xq, x_scale, 1, k)
        w = dequantize_fp8(wq, w_scale, 1, k)
    y = x @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---- Triton -----------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr,
                          PDL: tl.constexpr = False):
        # One program per (token, group): amax over the group, then scale and cast.
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        pdl_wait(PDL)  # x is an earlier kernel's
        start = g * GROUP
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(0, GROUP, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            ok = (off + tl.arange(0, BLOCK) < GROUP) & (cols < K)
            v = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-10) / FP8_MAX_C
        tl.store(s_ptr + row * stride_sm + g, scale)
        for off in range(0, GROUP, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            ok = (off + tl.arange(0, BLOCK) < GROUP) & (cols < K)
            v = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
            q = tl.clamp(v / scale, -FP8_MAX_C, FP8_MAX_C)
            tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=ok)

    # Counts that change from step to step are not specialised: Triton would otherwise compile
    # a variant for each of their classes (1, a multiple of 16, other) at first use, mid-serving.
    @triton.jit(do_not_specialize=["M"])
    def _fp8_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
        M, N, K, k_per_split,
        stride_am, stride_asm, stride_bn, stride_bsn, stride_om,
        BLOCK_WISE: tl.constexpr, SCALE_BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pdl_wait(PDL)  # the activations, their scales and the split-K tile counters (see quant_matmul)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
        b_rows = b_ptr + rn.to(tl.int64)[:, None] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = (kk < K)[None, :]
            a = tl.load(a_rows + kk[None, :], mask=m_ok[:, None] & k_ok, other=0.0)  # [BLOCK_M, BLOCK_K] fp8
            b = tl.load(b_rows + kk[None, :], mask=n_ok[:, None] & k_ok, other=0.0)  # [BLOCK_N, BLOCK_K] fp8
            if DOT_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            part = tl.dot(a, tl.trans(b))
            if BLOCK_WISE:
                kg = k0 // SCALE_BLOCK_C
                sa = tl.load(as_ptr + rm * stride_asm + kg, mask=m_ok, other=0.0)
                sb = tl.load(bs_ptr + (rn // SCALE_BLOCK_C) * stride_bsn + kg, mask=n_ok, other=0.0)
                acc += part * sa[:, None] * sb[None, :]
            else:
                acc += part
        if not BLOCK_WISE:
            sa = tl.load(as_ptr + rm * stride_asm, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptr + rn * stride_bsn, mask=n_ok, other=0.0)
            acc *= sa[:, None] * sb[None, :]
        # the output, or with split K a partial sum the tile's last program adds up (kernels/split_k.py)
        store_tile(acc, out_ptr, bias_ptr, ws_ptr, counter_ptr, rm, rn, M, N, stride_om, HAS_BIAS, SPLIT)


def quant_fp8_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quant_fp8_per_token_group_ref` (x [M, K] with unit column stride)."""
    assert HAS_TRITON, "triton is not installed"
    m, k = x.shape
    g = k if group == 0 else group
    ng = triton.cdiv(k, g)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(m, ng, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(g), 1024)
        _act_quant_kernel[(m, ng)](x, q, scales, k, x.stride(0), q.stride(0), scales.stride(0),
                                   GROUP=g, BLOCK=block, FP8_MAX_C=FP8_MAX, num_warps=4 if block >= 512 else 1,
                                   **pdl_launch(pdl_enabled(x.device)))
    return q, scales


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               block_wise: bool, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
               tiles: GemmTiles | None = None) -> torch.Tensor:
    """Triton version of `fp8_matmul_ref`."""
    assert HAS_TRITON, "triton is not installed"
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    t = tiles or choose_tiles(m, n, k, SCALE_BLOCK if block_wise else 0, xq.device)
    if block_wise:
        assert SCALE_BLOCK % t.block_k == 0 and SCALE_BLOCK % t.block_n == 0
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    split = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), split)
    assert grid[0] * grid[1] <= split_k.MAX_TILES or split == 1
    ws = torch.empty(split, m, n, dtype=torch.float32, device=xq.device) if split > 1 else out
    counters = split_k.tile_counters(xq.device) if split > 1 else out
    _fp8_gemm_kernel[grid](
        xq, x_scale, wq, w_scale, bias if bias is not None else x_scale, out, ws, counters,
        m, n, k, k_per_split,
        xq.stride(0), x_scale.stride(0), wq.stride(0), w_scale.stride(0), n,
        BLOCK_WISE=block_wise, SCALE_BLOCK_C=SCALE_BLOCK, HAS_BIAS=bias is not None,
        DOT_FP32=xq.device.type == "cpu", BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        SPLIT=split > 1, num_warps=t.num_warps, num_stages=t.num_stages, **pdl_launch(pdl_enabled(xq.device)),
    )
    return out


def fp8_tiles(m: int, n: int, k: int, device: torch.device) -> GemmTiles:
    """The weight-only policy with BLOCK_K = 128 (fp8 tensor-core steps) and BLOCK_N <= 128.

    TODO(lead, GPU): tune on H100 with benchmarks/bench_quant.py.
    """
    t = choose_tiles(m, n, k, SCALE_BLOCK, device)
    return GemmTiles(t.block_m, min(t.block_n, SCALE_BLOCK), SCALE_BLOCK, t.split_k, t.num_warps, t.num_stages)


# ---- torch built-in (GemmBackend.TORCH), per-channel only ------------------------------------------

def scaled_mm_per_channel(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales (sm90+, bf16 out; K and N multiples of 16)."""
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=bias, out_dtype=out_dtype)

